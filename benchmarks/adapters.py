#!/usr/bin/env python
"""LoRA adapters: the switch between units against a unit's render, and a render with
adapters against one without.

    .venv/bin/python benchmarks/adapters.py [--size 128] [--batch 2] [--steps 4] [--repeats 3]
                                             [--model DIR] [--dynamo]

On the tiny model (built here with ``klein-ray make-tiny-model`` unless ``--model`` names one),
with two random LoRAs (``make-tiny-lora``), through the model layer the worker uses
(``KleinModel`` with its adapters loaded once, ``AdapterSwitch`` per unit):

  baseline   the same model loaded without adapters, the same unit rendered;
  switch     ``AdapterSwitch.apply`` from one unit's adapter set to the next (none -> brand ->
             brand+product -> brand at 0.5 -> none), timed apart from the render it precedes;
  render     each unit rendered with its set active (LoRA layers unfused: their extra matmuls);
  fused      the model with ``brand`` in ``always`` (fused at load): what a row costs when its
             variant's adapter is fused rather than switched.

``--dynamo`` also counts, with torch.compile's dynamo on the repeated blocks (backend "eager":
the guards and graphs a compiled CUDA model has, without inductor's code generation), the graphs
each new adapter set traces and whether switching back to a set seen before traces any.

The tiny model's figures are for the code path, not for FLUX.2 klein's 4B/9B transformers: a
LoRA's extra cost is relative to layer widths. Medians of ``--repeats``; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SETS = [("none", ()), ("brand", (("brand", 1.0),)), ("brand+product", (("brand", 1.0), ("product", 0.8))),
        ("brand@0.5", (("brand", 0.5),)), ("none", ())]


def _request(args, adapters):
    from klein_ray.model.pipeline import RenderRequest

    return RenderRequest(prompts=[f"a product shot {i}" for i in range(args.batch)],
                         seeds=list(range(args.batch)), width=args.size, height=args.size,
                         steps=args.steps, guidance=1.0, adapters=adapters)


def _median_render(model, args, adapters) -> float:
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        model.render(_request(args, adapters))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _load(model_dir: str, loras: dict[str, Path], always: tuple[str, ...] = (), with_adapters: bool = True):
    from klein_ray.model.adapters import Adapter
    from klein_ray.model.pipeline import KleinModel

    adapters = tuple(Adapter(n, str(p / "pytorch_lora_weights.safetensors"), 1.0) for n, p in loras.items())
    return KleinModel.from_pretrained(model_dir, pipeline="distilled", device="cpu",
                                      adapters=adapters if with_adapters else (), always=always)


def measure(args, model_dir: str, loras: dict[str, Path]) -> dict:
    started = time.perf_counter()
    plain = _load(model_dir, loras, with_adapters=False)
    load_plain = time.perf_counter() - started
    plain.render(_request(args, ()))  # first call: allocations, prompt cache
    baseline = _median_render(plain, args, ())
    del plain

    started = time.perf_counter()
    model = _load(model_dir, loras)
    load_adapters = time.perf_counter() - started
    model.render(_request(args, ()))
    rows = []
    for i, (label, adapters) in enumerate(SETS):
        switches = []
        for _ in range(args.repeats):  # from the unit before's set each time
            model.adapters.apply(SETS[i - 1][1] if i else SETS[1][1])
            started = time.perf_counter()
            model.adapters.apply(adapters)
            switches.append(time.perf_counter() - started)
        render = _median_render(model, args, adapters)
        rows.append({"set": label, "switch_s": statistics.median(switches), "render_s": render,
                     "switch/render": statistics.median(switches) / render, "render/baseline": render / baseline})
    del model

    fused = _load(model_dir, loras, always=("brand",))
    fused.render(_request(args, ()))
    fused_s = _median_render(fused, args, ())
    return {"baseline_render_s": baseline, "load_s": {"plain": load_plain, "two adapters": load_adapters},
            "units": rows, "fused_brand_render_s": fused_s, "fused/baseline": fused_s / baseline}


def dynamo_graphs(args, model_dir: str, loras: dict[str, Path]) -> list[dict]:
    """Graphs dynamo traces for each unit's adapter set on the regionally compiled blocks."""
    import torch
    from torch._dynamo.utils import counters

    model = _load(model_dir, loras)
    model.pipe.transformer.compile_repeated_blocks(fullgraph=False, backend="eager")
    seen = []
    for label, adapters in [*SETS, ("brand (again)", (("brand", 1.0),)),
                            ("brand+product (again)", (("brand", 1.0), ("product", 0.8)))]:
        before = counters["stats"]["unique_graphs"]
        model.render(_request(args, adapters))
        seen.append({"set": label, "new_graphs": counters["stats"]["unique_graphs"] - before})
    torch._dynamo.reset()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a tiny model directory (default: built in a temporary one)")
    parser.add_argument("--dynamo", action="store_true", help="count the graphs each adapter set traces")
    args = parser.parse_args()

    from klein_ray.model.tiny import make_tiny_lora, make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny_model(Path(tmp) / "tiny"))
        loras = {n: make_tiny_lora(model_dir, Path(tmp) / n, seed=s) for n, s in (("brand", 1), ("product", 2))}
        figures = measure(args, model_dir, loras)
        if args.dynamo:
            figures["dynamo"] = dynamo_graphs(args, model_dir, loras)
    print(json.dumps({"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": sys.version.split()[0],
                      "args": vars(args), **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

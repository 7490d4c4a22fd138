#!/usr/bin/env python
"""Throughput benchmark: marginal cost per image and start-up of `klein-ray render` vs two baselines.

    .venv/bin/python benchmarks/throughput.py [--n 24] [--repeats 2] [--prompts 0] [--systems A,B,ours]
                                              [--ref REV] [--model DIR] [--keep DIR]

Every system renders the same rows with the tiny random FLUX.2 klein pipeline
(`klein-ray make-tiny-model`; its images are noise): 128x128, 4 steps, given seeds, PNG files
(zlib level 6 for all) to a local directory. By default every prompt is unique, so the prompt
cache (one of ours' features) saves nothing and cannot hide a cost elsewhere; ``--prompts 20``
makes the manifest catalog-like (20 distinct prompts cycling), ``--prompts K`` cycles K.

  A    a plain diffusers loop: ``Flux2KleinPipeline.from_pretrained`` once, one ``pipe(prompt=...)``
       call per row with its own ``torch.Generator``, ``image.save(path.png)``;
  B    the Ray Data batch-inference pattern from Ray's docs: ``ray.data.read_parquet`` ->
       ``map_batches(Renderer, batch_size=4, concurrency=1, num_cpus=1)`` where ``Renderer``
       loads the pipeline in ``__init__`` (torch threads 2) and renders a batch in one call
       (one generator per row) and writes its PNG files; ``materialize()`` runs it;
  ours ``klein-ray render MANIFEST --output OUT --config CFG --no-progress`` with one CPU variant
       (actors 1, batch_size 4), no ``--address``: it starts its own local Ray, as a user would;
  ref  with ``--ref REV``: the same command run by klein_ray as of git revision REV (``git
       archive``d into the work dir): before and after a change in one command. The metadata of
       every ref and ours output is checked to name the code meant to render it.

Each measurement is a separate subprocess (nothing warm) and is timed whole, from the parent:
interpreter start, imports, Ray start, model load, rendering, writing, shutdown. Each system runs
with N and 3N rows; then

    marginal = (T(3N) - T(N)) / 2N        start-up = T(N) - N * marginal

so start-up costs cancel out of the marginal figure (as far as they do not vary: see ``steady``).
Before timing, every system runs once on a few rows, untimed (``--warmup``), so that the OS file
cache holds torch, diffusers and Ray for all of them alike.
With ``--repeats R`` every (system, rows) pair runs R times, interleaved, and the fastest run is
used, since on a shared machine other work only ever adds time (``--estimator median`` to
change). Printed: the figures, the ratios ours/A, ours/B (with --ref also ours/ref, ref/A,
ref/B), whether the target (ours' marginal >= 20% below B's, start-up no higher than B's) is
met, each system's model call per image as timed inside it (A and B around ``pipe()``, ours
and ref ``timings.render`` in the metadata) and, for ours and ref, ``steady``: the seconds per
image between their first and last commits. Nothing here asserts on time.

This file holds the baselines A and B (they run as ``throughput.py --child a|b``; B's actor class
stays here, in ``__main__``, so that Ray pickles it by value), the manifests and configs, and the
command line; ``throughput_runs.py`` runs and times every system and prints the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # throughput_runs.py, beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_runs import (
    BATCH,
    ROOT,
    extract_ref,
    klein_ray_command,
    measure,
    report,
    run_one,
)

SIZE, STEPS = 128, 4
PROMPTS = [  # a product catalog: a few templates, products and backgrounds
    "studio photo of a red leather sneaker on a white background, soft shadow, catalog style",
    "product shot of a matte black ceramic mug, soft window light, e-commerce catalog",
    "a navy wool peacoat on an invisible mannequin, front view, plain grey backdrop",
    "close-up of a gold-plated wristwatch with a brown strap on black velvet",
    "a stack of three cotton towels in sage green, bathroom shelf, bright daylight",
    "a minimalist oak side table with a potted fern, scandinavian living room",
    "flat lay of a denim jacket, white sneakers and sunglasses on a beige surface",
    "a stainless steel water bottle with condensation droplets, outdoor picnic setting",
    "pair of noise-cancelling headphones in silver, floating, gradient blue background",
    "a hand-thrown terracotta vase with dried pampas grass, warm afternoon light",
    "a children's yellow raincoat hanging on a wooden peg, rainy window behind",
    "top view of a leather wallet, open, showing card slots, on a walnut desk",
    "a ceramic dinner set of four plates in speckled white, styled table setting",
    "a red road bicycle leaning against a brick wall, urban street, morning",
    "a linen summer dress in pale blue on a hanger, sunlit bedroom",
    "an espresso machine in brushed steel on a marble kitchen counter",
    "a pair of hiking boots covered in mud on a forest trail, autumn leaves",
    "a scented soy candle in an amber glass jar, cozy evening mood, bokeh lights",
    "a wireless mechanical keyboard with white keycaps, clean desk setup",
    "a silk scarf with a floral print draped over a chair, editorial fashion photo",
]


# -- the systems (each runs in its own subprocess) ---------------------------------------------

def child_a(manifest: str, out: str, model: str) -> dict:
    """Baseline A: a plain diffusers loop, one row per call."""
    import pyarrow.parquet as pq
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(manifest).to_pylist()
    model_s = 0.0
    for row in rows:
        t0 = time.perf_counter()
        image = pipe(prompt=row["prompt"], height=row["height"], width=row["width"],
                     num_inference_steps=row["steps"], guidance_scale=1.0,
                     generator=torch.Generator("cpu").manual_seed(row["seed"])).images[0]
        model_s += time.perf_counter() - t0
        image.save(Path(out) / f"{row['id']}.png")
    return {"images": len(rows), "torch_threads": torch.get_num_threads(),
            "model_ms_per_image": model_s / len(rows) * 1000}


class _Renderer:
    """Baseline B's actor: loads the pipeline once, renders one batch per call, writes PNGs."""

    def __init__(self, model: str, out: str):
        import torch
        from diffusers import Flux2KleinPipeline

        torch.set_num_threads(2)
        self.pipe = Flux2KleinPipeline.from_pretrained(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        t0 = time.perf_counter()
        images = self.pipe(
            prompt=[str(p) for p in batch["prompt"]], height=int(batch["height"][0]),
            width=int(batch["width"][0]), num_inference_steps=int(batch["steps"][0]),
            guidance_scale=1.0,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]],
        ).images
        per_image = (time.perf_counter() - t0) / len(images)
        paths = []
        for row_id, image in zip(batch["id"], images):
            path = self.out / f"{row_id}.png"
            image.save(path)
            paths.append(str(path))
        return {"id": batch["id"], "path": np.array(paths), "model_s": np.full(len(paths), per_image)}


def child_b(manifest: str, out: str, model: str) -> dict:
    """Baseline B: Ray Data read_parquet -> map_batches(actor class) -> materialize."""
    import ray
    import ray.data

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(manifest)
    # Sizes are the same for every row here, so a batch of 4 is one diffusers call, as in ours.
    # num_cpus=1: an actor reserving both cores starves the read tasks (Ray Data hangs).
    ds = ds.map_batches(_Renderer, fn_constructor_args=(model, out), batch_size=BATCH,
                        concurrency=1, num_cpus=1, batch_format="numpy")
    done = ds.materialize()
    count = done.count()
    model_ms = done.sum("model_s") / count * 1000
    ray.shutdown()
    return {"images": count, "model_ms_per_image": model_ms}


# -- the parent --------------------------------------------------------------------------------

def prompt_of(i: int, distinct: int) -> str:
    """Row i's prompt: ``distinct`` prompts cycling, or every prompt unique when ``distinct`` is 0."""
    if distinct:
        return PROMPTS[i % distinct % len(PROMPTS)] if distinct <= len(PROMPTS) else \
            f"{PROMPTS[i % distinct % len(PROMPTS)]}, shot {i % distinct // len(PROMPTS)}"
    return f"{PROMPTS[i % len(PROMPTS)]}, item {i}"


def write_manifest(path: Path, rows: int, distinct: int = len(PROMPTS)) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": [f"sku-{i:06d}" for i in range(rows)],
        "prompt": [prompt_of(i, distinct) for i in range(rows)],
        "width": pa.array([SIZE] * rows, pa.int32()),
        "height": pa.array([SIZE] * rows, pa.int32()),
        "steps": pa.array([STEPS] * rows, pa.int32()),
        "seed": pa.array([1_000_003 * i + 17 for i in range(rows)], pa.int64()),
    })
    pq.write_table(table, path)


def write_config(path: Path, model: str, png_level: bool = True) -> None:
    # PNG level 6, as the baselines' image.save writes, so that every system encodes alike.
    # A --ref revision may predate the setting (its config refuses unknown keys): none there.
    path.write_text(
        "default_variant: tiny\n"
        "variants:\n"
        f"  tiny: {{source: {json.dumps(model)}, actors: 1, batch_size: {BATCH}, steps: {STEPS}}}\n"
        + ("output: {format: png, png_compress_level: 6}\n" if png_level else "output: {format: png}\n")
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="rows in the small run; the large one has 3N")
    p.add_argument("--repeats", type=int, default=2, help="runs per (system, rows), interleaved")
    p.add_argument("--estimator", choices=["min", "median"], default="min",
                   help="how repeats are combined (default: the fastest run)")
    p.add_argument("--warmup", type=int, default=4, help="rows of the untimed warm-up run per system (0: none)")
    p.add_argument("--prompts", type=int, default=0,
                   help=f"distinct prompts cycling through the rows (default 0: every prompt unique, "
                        f"so the prompt cache saves nothing; {len(PROMPTS)}: a catalog)")
    p.add_argument("--ref", metavar="REV", help="also run klein-ray as of this git revision (e.g. HEAD), "
                   "as system 'ref': before and after a change in one command")
    p.add_argument("--model", help="tiny model directory (default: build one in the temp dir)")
    p.add_argument("--systems", default="A,B,ours", help="comma-separated subset of A,B,ours")
    p.add_argument("--keep", help="keep manifests and outputs in this directory")
    p.add_argument("--child", choices=["a", "b"], help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def prepare_model(args: argparse.Namespace, work: Path) -> str:
    """The tiny model's directory: ``--model``, or one built in the work dir."""
    model = args.model
    if not model:
        model = str(work / "tiny-klein")
        subprocess.run(klein_ray_command() + ["make-tiny-model", model], cwd=ROOT, check=True,
                       capture_output=True)
    return str(Path(model).resolve())


def warm_up(args: argparse.Namespace, systems: list[str], work: Path, run) -> None:
    """One untimed run per system, so that the OS file cache is warm for all of them alike."""
    warm = work / "manifest-warmup.parquet"
    write_manifest(warm, args.warmup, args.prompts)
    for system in systems:
        r = run(system, warm, work / f"out-{system}-warmup")
        print(f"  warm-up {system:<4} ({args.warmup} rows, untimed): {r['seconds']:.2f} s", flush=True)


def main() -> int:
    args = parse_args()
    if args.child:
        info = (child_a if args.child == "a" else child_b)(args.manifest, args.out, args.model)
        print(json.dumps(info))
        return 0

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="klein-ray-throughput-") if not args.keep else None
    work = Path(args.keep or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    ref_dir, ref_rev = None, ""
    if args.ref:
        ref_dir = work / "ref-src"
        ref_rev = extract_ref(args.ref, ref_dir)
        systems = [s for s in systems if s != "ref"]
        systems.insert(systems.index("ours") if "ours" in systems else len(systems), "ref")
    model = prepare_model(args, work)
    config = work / "job.yaml"
    write_config(config, model)
    write_config(work / "job-ref.yaml", model, png_level=False)
    sizes = {"N": args.n, "3N": 3 * args.n}
    manifests = {label: work / f"manifest-{label}.parquet" for label in sizes}
    for label, rows in sizes.items():
        write_manifest(manifests[label], rows, args.prompts)

    print(f"# throughput: tiny random FLUX.2 klein pipeline (images are noise), {SIZE}x{SIZE}, "
          f"{STEPS} steps, png to a local directory; N={args.n}; "
          f"{f'{args.prompts} distinct prompts cycling' if args.prompts else 'every prompt unique'}"
          f"{f'; ref = {args.ref} ({ref_rev})' if args.ref else ''}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, {datetime.date.today()}", flush=True)

    def run(system: str, manifest: Path, out: Path) -> dict:
        return run_one(system if system in ("ours", "ref") else system.lower(), manifest, out, model,
                       config, ref_dir)

    if args.warmup:
        warm_up(args, systems, work, run)
    times, last = measure(systems, sizes, manifests, work, args.repeats, run)
    report(systems, times, last, args.n, args.estimator, args.repeats)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU benchmark: seconds per image of full-size FLUX.2 klein 4B / 9B architectures (random weights):
diffusers as it is vs klein-ray's model layer at its defaults, end to end through the render
worker, in fp8, and the text encoder alone.

    .venv/bin/python benchmarks/gpu.py [--variants 4b,9b] [--sizes 1024] [--batches 4] [--reps 3]
        [--ours-settings default|none|compile,channels_last] [--warmup plan|shape] [--rows ...]
        [--fp8 auto|on|off] [--fp8-variants 4b] [--worker-variants 4b] [--kv-refs 3] [--json FILE]
    .venv/bin/python benchmarks/gpu.py --quick --json gpu.json     # the "done when" figures (aim: < 8 min)
    .venv/bin/python benchmarks/gpu.py --dry-run                   # no GPU: CPU, --scale tiny

Needs a CUDA GPU. Without one it prints "needs a CUDA GPU; see benchmarks/README.md" and exits
with code 2 (nothing measured), unless ``--dry-run`` is given. The models (``gpu_build.py``) are
built in memory with the published architectures and RANDOM weights: their images are noise.

Per variant, in bf16 on cuda, 4 steps, for each size and batch (``--reps`` timed calls after one
untimed, median kept, ``torch.cuda.synchronize`` around each; PIL images out, as both return),
all in one process so that every ratio compares figures taken minutes apart on one card:

  (c) ``text``: the text encoder alone: ``pipe.encode_prompt`` vs ``PromptEncoder.encode``
      (cache off), and the largest difference between their embeddings;
  (a) diffusers: ``pipe(prompt=[...], generator=[one per image], num_inference_steps=4,
      guidance_scale=1.0, height, width)``, on the pipeline BEFORE anything wraps it;
  (b0) ``eager``: ``KleinModel.from_pipe(pipe, settings=eager).render(...)``, nothing compiled;
  (b) ours at ``--ours-settings`` (default: ``GPUSettings()``, what a job gets: on CUDA regional
      compile + channels-last VAE; on CPU neither), wrapped with ``from_pipe`` (which changes the
      pipeline in place: hence (a) first), warmed up first with
      ``model.warm_up(warmup_plan(sizes, batch))`` as a worker does at load (the warm-up seconds are
      a figure of their own), prompts new to the cache (the encoder runs);
  (b+) ``cached``: the same with every prompt already cached;
  (e) ``worker`` (``gpu_worker.py``; ``--worker-variants``, first size, largest batch): end to end
      through ``RenderWorker.render_unit`` (render, PNG encode, sha256, commit to a local store)
      with ``run.in_flight_per_actor`` units in flight, against the bare model call; ``serial``
      adds the same units one at a time (bf16 only);
  (f) ``fp8`` (``gpu_fp8.py``; ``--fp8-variants``, first size, largest batch; ``--fp8 auto`` runs
      it where ``fp8_problem(device)`` is None): the same weights with ``precision="fp8"``, speed
      against (b) and fidelity (transformer output, pixels), and through the worker when (e) runs;
  (d) ``kv`` (``gpu_kv.py``): on a fresh 9B, a ``--kv-refs``-reference edit at the first size,
      batch 1, eager, through ``Flux2KleinPipeline`` and ``Flux2KleinKVPipeline``.

``--rows`` picks among text, eager, cached, worker, serial, fp8, kv ((a) and (b) always run).
``--quick``: 4B and 9B at 1024² batch 4, rows worker and fp8 only, each model warmed up for the
timed shape alone (``--warmup shape``): (a), (b) and (e) of the 4B, (f) of the 4B end to end,
(a) and (b) of the 9B. Every compiled model's warm-up is in the run: minutes on a fresh machine.

A row that raises (an out-of-memory, a kernel this build lacks, a package missing for (e)) is
reported and recorded, and the others still run; the exit code is then 1. ``--json`` is written
after every row, so a run cut short keeps its figures; ``--budget-s`` starts no row after it.

``--dry-run`` checks ``from_pipe`` against ``from_pretrained`` (bitwise-equal images) and the
full-size configs on the ``meta`` device, then runs every row on CPU at ``--scale tiny`` in fp32
(CPU defaults: nothing compiled; ``--ours-settings compile,channels_last`` compiles with
inductor's C++ backend, slowly).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # klein_ray, and the gpu_*.py beside this script

NO_GPU_MESSAGE = "needs a CUDA GPU; see benchmarks/README.md"
EXIT_NO_GPU = 2
SEED = 0  # every variant's random weights (the fp8 row rebuilds with it)
ROWS = ("text", "eager", "cached", "worker", "serial", "fp8", "kv")
QUICK_ROWS = ("worker", "fp8")


@dataclass
class Bench:
    """What every row needs: where it runs, what it times, and the record of what was measured."""

    device: str
    dtype: Any
    scale: str
    tokenizer: Any
    sizes: list[int]
    batches: list[int]
    reps: int
    settings: Any  # GPUSettings of (b)
    warmup: str  # plan | shape
    rows: set[str]
    worker_variants: set[str]
    fp8_variants: set[str]
    worker_units: int
    in_flight: int | None
    json_path: str | None
    budget_s: float | None
    started: float = field(default_factory=time.perf_counter)
    record: dict = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def points(self) -> list[tuple[int, int]]:
        return [(size, batch) for size in self.sizes for batch in self.batches]

    def plan(self) -> list:
        from klein_ray.model.accel import WarmupShape, warmup_plan

        if self.warmup == "shape":
            return [WarmupShape(size, size, batch) for size, batch in self.points]
        return warmup_plan([(size, size, 0) for size in self.sizes], max(self.batches))

    def allow(self, what: str) -> bool:
        """False (and says so) once ``--budget-s`` seconds have passed."""
        elapsed = time.perf_counter() - self.started
        if self.budget_s is not None and elapsed > self.budget_s:
            print(f"  skipped {what}: {elapsed:.0f} s elapsed, over --budget-s {self.budget_s:g}", flush=True)
            return False
        return True

    def save(self) -> None:
        """Write the figures so far (after every row: a run cut short keeps what it measured)."""
        if self.json_path:
            self.record.update(elapsed_s=time.perf_counter() - self.started, failed=self.failed)
            Path(self.json_path).write_text(json.dumps(self.record, indent=1, default=str))

    def guarded(self, what: str, fn) -> dict:
        """``fn()``, or ``{"error": ...}`` if it raised: one row's failure (an OOM, a kernel a
        build lacks) must not cost the others their figures in a single GPU run."""
        from gpu_build import free

        try:
            return fn()
        except Exception as exc:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
            print(f"  FAILED {what}: {error}", flush=True)
            self.failed.append(f"{what}: {error}")
        finally:
            self.save()
        free(self.device)  # out of the except clause: what the traceback's frames held is gone
        return {"error": error}


def parse_settings(text: str):
    """``--ours-settings``: default (GPUSettings(), auto by device), none, or the ones to force on."""
    from klein_ray.model.accel import GPUSettings

    text = text.strip()
    if text in ("", "default", "auto"):
        return GPUSettings()
    if text in ("none", "eager"):
        return GPUSettings(compile=False, channels_last=False)
    names = {name.strip() for name in text.split(",") if name.strip()}
    if names - {"compile", "channels_last"}:
        raise SystemExit(f"--ours-settings: unknown {sorted(names - {'compile', 'channels_last'})}")
    return GPUSettings(compile="compile" in names, channels_last="channels_last" in names)


def elapsed(b: Bench) -> str:
    return f"[{time.perf_counter() - b.started:.0f} s]"


# -- per variant ----------------------------------------------------------------------------------

def extra_rows(model, b: Bench, variant: str, out: dict) -> None:
    """(e) and (f) for this variant, at the first size and the largest batch."""
    from functools import partial

    from gpu_build import build_pipeline, free

    size, batch = b.sizes[0], max(b.batches)
    diffusers = next(r["diffusers_s_per_image"] for r in out["render"] if (r["size"], r["batch"]) == (size, batch))

    def worker(m, label: str, warm: dict) -> dict:  # (e) for one model
        def run():
            from gpu_worker import bench_worker  # here, guarded: it imports the worker's stack (pydantic...)

            return bench_worker(m, variant=variant, label=label, size=size, batch=batch, units=b.worker_units,
                                in_flight=b.in_flight, serial="serial" in b.rows and label == "bf16", warmup=warm,
                                cuda=b.cuda)

        return dict(b.guarded(f"(e) {variant} {label}", run), diffusers_s_per_image=diffusers)

    with_worker = "worker" in b.rows and variant in b.worker_variants
    if with_worker and b.allow(f"(e) {variant}"):
        out["worker"] = worker(model, "bf16", out["warmup"])
    if "fp8" in b.rows and variant in b.fp8_variants and b.allow(f"(f) {variant}"):
        from gpu_fp8 import bench_fp8

        build = partial(build_pipeline, variant, b.scale, b.device, b.dtype, b.tokenizer, seed=SEED)
        out["fp8"] = b.guarded(f"(f) {variant}", lambda: bench_fp8(
            model, build, variant=variant, size=size, batch=batch, reps=b.reps, device=b.device, plan=b.plan(),
            worker=worker if with_worker else None))
        out["fp8"]["diffusers_s_per_image"] = diffusers
        free(b.device)  # the fp8 model, also when its row failed


def bench_variant(b: Bench, variant: str) -> dict:
    import torch
    from gpu_build import build_pipeline, free, sync
    from gpu_rows import bench_ours, bench_text, settings_text, time_diffusers, time_ours

    from klein_ray.model.accel import GPUSettings, compiled_graphs
    from klein_ray.model.pipeline import KleinModel

    t0 = time.perf_counter()
    pipe = build_pipeline(variant, b.scale, b.device, b.dtype, b.tokenizer, seed=SEED)
    sync(b.device)
    out = {"variant": variant, "scale": b.scale, "build_s": time.perf_counter() - t0, "render": [], "text": []}
    b.record["results"].append(out)  # saved as it fills up
    if b.cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"## {variant} ({b.scale}) built in {out['build_s']:.1f} s on {b.device} {elapsed(b)}", flush=True)
    if "text" in b.rows:
        out["text"] = bench_text(pipe, b)
        b.save()
    diffusers = {(s, n): time_diffusers(pipe, b, variant, s, n) for s, n in b.points}  # (a): before wrapping
    eager = {}
    if "eager" in b.rows:
        plain = KleinModel.from_pipe(pipe, settings=GPUSettings(compile=False, channels_last=False))
        eager = {(s, n): time_ours(plain, b, f"e{variant}", s, n) for s, n in b.points}
        del plain
    model = KleinModel.from_pipe(pipe, settings=b.settings)
    out.update(settings=model.settings, accel=model.accel_report, warmup=model.warm_up(b.plan()))
    w = out["warmup"]
    print(f"  (b) ours: {settings_text(model.settings)}; warm-up {w['calls']} call(s) in {w['seconds']:.1f} s, "
          f"{w['graphs']} graph(s) traced, {w['compiled']} compiled anew {elapsed(b)}", flush=True)
    graphs = compiled_graphs()
    out["render"] = bench_ours(model, b, variant, diffusers, eager)
    out["graphs_compiled_after_warmup"] = compiled_graphs() - graphs
    b.save()
    if b.cuda:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory allocated, (a) and (b): {out['peak_gpu_gib']:.1f} GiB", flush=True)
    extra_rows(model, b, variant, out)
    del model, pipe
    free(b.device)
    torch._dynamo.reset()  # the next variant's blocks compile afresh, under their own recompile limit
    return out


def bench_kv_row(b: Bench, n_refs: int) -> dict:
    """(d): the 9B, built afresh (the variants' pipelines are gone), through gpu_kv.bench_kv, eager."""
    from gpu_build import build_pipeline, free, timed
    from gpu_kv import bench_kv

    from klein_ray.model.accel import GPUSettings

    print(f"## 9b ({b.scale}): {n_refs}-reference edit, without and with the KV cache {elapsed(b)}", flush=True)
    pipe = build_pipeline("9b", b.scale, b.device, b.dtype, b.tokenizer, seed=SEED)
    out = bench_kv(pipe, b.device, b.sizes[0], n_refs, b.reps, timed,
                   settings=GPUSettings(compile=False, channels_last=False))
    del pipe
    free(b.device)
    return out


# -- command line ---------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="4b,9b")
    p.add_argument("--sizes", help="output sides (default 1024; dry-run 128,64)")
    p.add_argument("--batches", help="images per call (default 4; dry-run 1,4)")
    p.add_argument("--reps", type=int, help="timed calls per point, median kept (default 3; dry-run 1)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: CPU checks at --scale")
    p.add_argument("--scale", choices=["full", "tiny"], help="model size (default full; dry-run tiny)")
    p.add_argument("--quick", action="store_true", help="the 'done when' figures only (see above)")
    p.add_argument("--ours-settings", default="default",
                   help="GPUSettings of (b): default (auto by device), none, or compile,channels_last forced on")
    p.add_argument("--warmup", choices=["plan", "shape"], help="plan: warmup_plan(sizes, batch), as a worker "
                   "does (default); shape: the timed shapes only (--quick)")
    p.add_argument("--rows", help=f"optional rows, comma-separated, of {','.join(ROWS)} "
                   f"(default all; --quick: {','.join(QUICK_ROWS)})")
    p.add_argument("--fp8", choices=["auto", "on", "off"], default="auto",
                   help="row (f); auto: where the device computes in fp8 (fp8_problem is None)")
    p.add_argument("--fp8-variants", default="4b", help="variants row (f) runs for (default 4b)")
    p.add_argument("--worker-variants", default="4b", help="variants row (e) runs for (default 4b)")
    p.add_argument("--worker-units", type=int, help="timed units in row (e) (default 6; dry-run 3)")
    p.add_argument("--in-flight", type=int, help="units in flight in row (e) (default run.in_flight_per_actor)")
    p.add_argument("--kv-refs", type=int, help="references in the KV row (default 3; 0 or --quick skips it)")
    p.add_argument("--budget-s", type=float, help="start no further row after this many seconds")
    p.add_argument("--compile-cache", help="a directory: load compile artifacts from it first, save them after")
    p.add_argument("--json", help="also write the figures here (after every variant)")
    return p.parse_args()


def make_bench(args: argparse.Namespace, device: str, dtype) -> Bench:
    from klein_ray.model.fp8 import fp8_problem
    from klein_ray.model.tiny import _train_tokenizer

    rows = {r.strip() for r in (args.rows or ",".join(QUICK_ROWS if args.quick else ROWS)).split(",") if r.strip()}
    if rows - set(ROWS):
        raise SystemExit(f"--rows: unknown {sorted(rows - set(ROWS))}")
    if args.fp8 == "off" or (args.fp8 == "auto" and fp8_problem(device)):
        rows.discard("fp8")
    kv_refs = args.kv_refs if args.kv_refs is not None else (0 if args.quick else 3)
    if not kv_refs:
        rows.discard("kv")

    def names(text):
        return [v.strip() for v in text.split(",") if v.strip()]

    return Bench(
        device=device, dtype=dtype, scale=args.scale or ("tiny" if args.dry_run else "full"),
        tokenizer=_train_tokenizer(), reps=args.reps or (1 if args.dry_run else 3),
        sizes=[int(s) for s in names(args.sizes or ("128,64" if args.dry_run else "1024"))],
        batches=[int(n) for n in names(args.batches or ("1,4" if args.dry_run else "4"))],
        settings=parse_settings(args.ours_settings), warmup=args.warmup or ("shape" if args.quick else "plan"),
        rows=rows, worker_variants=set(names(args.worker_variants)), fp8_variants=set(names(args.fp8_variants)),
        worker_units=args.worker_units or (3 if args.dry_run else 6), in_flight=args.in_flight,
        json_path=args.json, budget_s=args.budget_s, record={"kv_refs": kv_refs})


def compile_cache(directory: str | None, save: bool) -> None:
    """``--compile-cache``: PyTorch's portable compile artifacts, loaded before and saved after."""
    from klein_ray.model import accel

    if not directory:
        return
    path = Path(directory) / "gpu-bench.torch-compile-cache"
    if save:
        data = accel.save_artifacts()
        if data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"compile artifacts saved: {path} ({len(data) / 1e6:.1f} MB)", flush=True)
    elif path.exists():
        print(f"compile artifacts from {path}: {'loaded' if accel.load_artifacts(path.read_bytes()) else 'unusable'}",
              flush=True)


def main() -> int:
    args = parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_NO_GPU
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")  # random weights
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers
    from gpu_build import check_from_pipe, check_full_configs
    from gpu_rows import print_tables

    device = "cuda" if cuda and not args.dry_run else "cpu"
    b = make_bench(args, device, torch.bfloat16 if device == "cuda" else torch.float32)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    meta = {"host": platform.node(), "gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "date": str(datetime.date.today()), "device": device,
            "dtype": str(b.dtype), "scale": b.scale, "dry_run": args.dry_run, "rows": sorted(b.rows),
            "warmup": b.warmup, "sizes": b.sizes, "batches": b.batches, "reps": b.reps}
    print(f"# gpu benchmark: {meta['host']}, GPU {gpu}, torch {meta['torch']}, diffusers {meta['diffusers']}, "
          f"transformers {meta['transformers']}, {meta['date']}; RANDOM weights (images are noise); device "
          f"{device} {b.dtype}, scale {b.scale}{', DRY RUN' if args.dry_run else ''}; rows a, b, "
          f"{', '.join(sorted(b.rows))}; warm-up: {b.warmup}", flush=True)
    compile_cache(args.compile_cache, save=False)
    if args.dry_run:
        check_from_pipe(b.tokenizer)
        check_full_configs(b.tokenizer)
    b.record.update(meta=meta, results=[], kv=None)
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if b.allow(f"variant {variant}"):
            b.guarded(f"variant {variant}", lambda v=variant: bench_variant(b, v))
    if "kv" in b.rows and b.allow("the KV row"):
        b.record["kv"] = b.guarded("(d) kv", lambda: bench_kv_row(b, b.record["kv_refs"]))
    compile_cache(args.compile_cache, save=True)
    b.save()
    print_tables([r for r in b.record["results"] if "warmup" in r], b.record["kv"])
    print(f"\ntotal {time.perf_counter() - b.started:.0f} s")
    if args.dry_run:
        print("\nDRY RUN on CPU at a reduced scale: the figures above check the code path, they are "
              "not GPU measurements.")
    if b.failed:
        print("FAILED:\n- " + "\n- ".join(b.failed))
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())

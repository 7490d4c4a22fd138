"""Row (e) of ``benchmarks/gpu.py``: end to end through the render worker, as a job runs a unit.

A ``klein_ray.worker.render.RenderWorker`` renders each unit on its model thread, encodes the PNGs
on its pool (as many threads as the actor's CPUs: one for a GPU actor by default), hashes them
and commits every row through the ledger to a local store (``LocalStore`` on a temporary
directory), driven by the in-process executor (``InProcessExecutor``) with
``run.in_flight_per_actor`` units in flight, as the driver keeps them. Seconds per image are
the wall time of N units over their images, after one untimed unit; beside them, the bare model
call: the same number of calls of ``KleinModel.render`` on the same model thread, one after the
other, nothing else. Optionally (``serial``) the same units one at a time (in flight 1).

A RenderWorker loads its model from disk; the full-size models live in memory only (16-34 GB
would have to be written out first), so the worker is built with ``RenderWorker(spec, model)``
around the benchmark's model; the rest (``render_unit``, encoding, the ledger, the metadata) is
the worker's own code. What it leaves out of the load: the compile-cache round trip
(``_warm_up``: the benchmark warmed the model up itself, with the same ``warmup_plan``); the
rows say ``generated_by_test_model`` (random weights).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import deque

from gpu_build import prompts_for  # beside this script

from klein_ray.config import JobConfig, RunConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.model.accel import compiled_graphs
from klein_ray.model.pipeline import RenderRequest
from klein_ray.output.ledger import Ledger
from klein_ray.scheduling.pools import worker_specs
from klein_ray.types import RowSpec, UnitOutcome, WorkUnit
from klein_ray.worker.render import RenderWorker

STEPS = 4


def job_config(name: str, model, batch: int, in_flight: int, cuda: bool) -> JobConfig:
    """The job a worker of this model would be given: one variant, this model's settings."""
    s = model.settings
    variant = VariantConfig(source=model.info.source, gpus_per_actor=1 if cuda else 0, batch_size=batch,
                            compile=s["compile"], channels_last=s["channels_last"],
                            precision="fp8" if s["precision"] == "fp8" else "auto")
    return JobConfig(default_variant=name, variants={name: variant},
                     run=RunConfig(in_flight_per_actor=in_flight))


def make_units(name: str, size: int, batch: int, count: int, tag: str, first_id: int) -> list[WorkUnit]:
    """``count`` units of ``batch`` PNG rows each, every prompt new (the encoder runs)."""
    units = []
    for u in range(count):
        rows = tuple(RowSpec(id=f"{tag}-{u}-{j}", prompt=p, variant=name, references=(), width=size, height=size,
                             steps=STEPS, guidance=1.0, seed=1000 * u + j, seed_source="manifest", format="png")
                     for j, p in enumerate(prompts_for(u, batch, tag)))
        units.append(WorkUnit(unit_id=first_id + u, variant=name, width=size, height=size, steps=STEPS,
                              guidance=1.0, references=(), rows=rows))
    return units


def run_units(executor, pool, units: list[WorkUnit], in_flight: int) -> tuple[float, list]:
    """The driver's loop, reduced: keep ``in_flight`` units submitted until all came back."""
    todo, outcomes = deque(units), []
    t0 = time.perf_counter()
    while todo or executor.in_flight:
        while todo and executor.in_flight < in_flight:
            executor.submit(pool, todo.popleft())
        outcomes.extend(executor.collect(timeout=60.0))
    seconds = time.perf_counter() - t0
    for unit, outcome in outcomes:
        if not isinstance(outcome, UnitOutcome) or outcome.errors or len(outcome.results) != unit.size:
            detail = outcome.errors[0] if isinstance(outcome, UnitOutcome) and outcome.errors else outcome
            raise RuntimeError(f"unit {unit.unit_id} did not commit all its rows: {detail}")
    return seconds, [r for _, outcome in outcomes for r in outcome.results]


def bare_calls(worker: RenderWorker, units: list[WorkUnit]) -> float:
    """Seconds for ``KleinModel.render`` of these units, one after the other, on the model thread."""
    t0 = time.perf_counter()
    for unit in units:
        request = RenderRequest(prompts=[r.prompt for r in unit.rows], seeds=[r.seed for r in unit.rows],
                                width=unit.width, height=unit.height, steps=unit.steps, guidance=unit.guidance)
        worker._model_thread.run(worker.model.render, request)  # PIL images out: the GPU is done
    return time.perf_counter() - t0


def check_committed(ledger: Ledger, results: list) -> None:
    """Every row's marker is there, and the stored image is the bytes it names (sha256)."""
    for result in results:
        if ledger.committed(result.id) is None:
            raise RuntimeError(f"row {result.id}: no commit marker in the store")
        if hashlib.sha256(ledger.store.get(result.image_key)).hexdigest() != result.sha256:
            raise RuntimeError(f"row {result.id}: stored image does not match its sha256")


def bench_worker(model, *, variant: str, label: str, size: int, batch: int, units: int, in_flight: int | None,
                 serial: bool, warmup: dict, cuda: bool) -> dict:
    """Row (e) for ``model`` (a warmed-up ``KleinModel``): e2e and bare seconds per image.
    ``in_flight``: None for the job default (``run.in_flight_per_actor``)."""
    name = f"klein-{variant}"
    in_flight = in_flight or RunConfig().in_flight_per_actor
    graphs = compiled_graphs()
    with tempfile.TemporaryDirectory(prefix="klein-ray-gpu-worker-") as out:
        cfg = job_config(name, model, batch, in_flight, cuda)
        holder: list[RenderWorker] = []
        executor = InProcessExecutor(worker_factory=lambda _spec: holder[0])
        spec = worker_specs(cfg, executor, [name], out, {name: model.info.source}, output_was_empty=True,
                            sizes={name: ((size, size, 0),)})[name][0]
        holder.append(RenderWorker(spec, model, test_model=True, warmup=warmup))
        pool = executor.start_pool(spec, 1, 0, 0)
        if executor.wait_ready([pool], 60.0, lambda: False):
            raise RuntimeError("the in-memory worker did not come up")
        try:
            run_units(executor, pool, make_units(name, size, batch, 1, f"{label}-warm", 0), in_flight)
            bare = bare_calls(holder[0], make_units(name, size, batch, units, f"{label}-bare", 100))
            e2e, results = run_units(executor, pool, make_units(name, size, batch, units, f"{label}-e2e", 200),
                                     in_flight)
            one = run_units(executor, pool, make_units(name, size, batch, units, f"{label}-one", 300), 1)[0] \
                if serial else None
            check_committed(holder[0].ledger, results)
        finally:
            executor.shutdown([pool])
            holder[0]._encoders.shutdown()
    images = units * batch
    row = {"model": label, "size": size, "batch": batch, "units": units, "images": images, "in_flight": in_flight,
           "encoder_threads": spec.threads, "bare_s_per_image": bare / images, "e2e_s_per_image": e2e / images,
           "e2e_over_bare": e2e / bare, "serial_s_per_image": one / images if one else None,
           "graphs_compiled_in_row": compiled_graphs() - graphs}
    for stage in ("render", "encode", "store"):
        row[f"{stage}_s_mean"] = sum(r.timings.get(stage, 0.0) for r in results) / len(results)
    row["png_bytes_mean"] = sum(r.bytes for r in results) / len(results)
    serial_text = f", one unit at a time {row['serial_s_per_image']:.3f}" if one else ""
    print(f"  (e) worker {label} {size}x{size} batch {batch}, {units} units, {in_flight} in flight, "
          f"{spec.threads} encoder thread(s): end to end {row['e2e_s_per_image']:.3f} s/img, bare model call "
          f"{row['bare_s_per_image']:.3f} s/img ({row['e2e_over_bare']:.2f}x){serial_text}; per image: encode "
          f"{row['encode_s_mean']:.3f} s, store {row['store_s_mean']:.3f} s, PNG {row['png_bytes_mean'] / 1e6:.2f} MB; "
          f"graphs compiled in the row {row['graphs_compiled_in_row']}", flush=True)
    return row


def table(rows: list[tuple[str, dict, float | None]]) -> None:
    """(variant, row, diffusers s/img or None) as a Markdown table."""
    print("\n| variant | model | size | batch | images | in flight | bare s/img | end-to-end s/img | e2e/bare "
          "| e2e/diffusers | one at a time s/img | encode s/img | store s/img | PNG MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r, diffusers in rows:
        vs = f"{r['e2e_s_per_image'] / diffusers:.2f}" if diffusers else "-"
        one = f"{r['serial_s_per_image']:.3f}" if r["serial_s_per_image"] else "-"
        print(f"| {variant} | {r['model']} | {r['size']} | {r['batch']} | {r['images']} | {r['in_flight']} | "
              f"{r['bare_s_per_image']:.3f} | {r['e2e_s_per_image']:.3f} | {r['e2e_over_bare']:.2f} | {vs} | {one} | "
              f"{r['encode_s_mean']:.3f} | {r['store_s_mean']:.4f} | {r['png_bytes_mean'] / 1e6:.2f} |")

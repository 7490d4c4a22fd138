"""How ``benchmarks/throughput.py`` runs and times each system, and the figures it prints.

It owns the parent's side: the command each system runs as (A and B as ``throughput.py --child``,
ours as ``klein-ray render``, ref as ``python -m klein_ray`` from a ``git archive`` of REV), one
timed subprocess per run with its output checked, the interleaved repeats, and the report
(marginal cost, start-up, ratios, targets, the model call timed inside each system and ``steady``).
Nothing here imports torch, diffusers or Ray.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
SCRIPT = HERE.with_name("throughput.py")  # runs baselines A and B: ``throughput.py --child a|b``
BATCH = 4  # rows per model call in B and ours; ``steady`` leaves out the first unit of this size
RUN_TIMEOUT_S = 900  # one system's run; far above any seen here
NAMES = {"A": "A: diffusers loop", "B": "B: Ray Data map_batches", "ref": "ref: klein-ray render, --ref",
         "ours": "ours: klein-ray render"}


def klein_ray_command() -> list[str]:
    script = Path(sys.executable).parent / "klein-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "klein_ray"]


def extract_ref(rev: str, dest: Path) -> str:
    """klein_ray as of git revision ``rev``, in ``dest``, its version marked ``+ref`` (so the
    metadata shows which code rendered). Returns the revision's short hash."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "klein_ray"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    init = dest / "klein_ray" / "__init__.py"
    text = init.read_text()
    init.write_text(text.replace('__version__ = "', '__version__ = "ref+', 1))
    return short


def _command(system: str, manifest: Path, out: Path, model: str, config: Path,
             ref_dir: Path | None) -> tuple[list[str], dict, Path]:
    """The command line, environment and working directory of one run of ``system``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    cwd = ROOT
    if system == "ours":
        cmd = klein_ray_command() + ["render", str(manifest), "--output", str(out),
                                     "--config", str(config), "--no-progress"]
    elif system == "ref":  # the old code first on the path of the driver and (cwd) of Ray's workers
        cmd = [sys.executable, "-m", "klein_ray", "render", str(manifest), "--output", str(out),
               "--config", str(config.with_name("job-ref.yaml")), "--no-progress"]
        env["PYTHONPATH"] = str(ref_dir)
        cwd = ref_dir
    else:
        cmd = [sys.executable, str(SCRIPT), "--child", system, "--manifest", str(manifest),
               "--out", str(out), "--model", model]
    return cmd, env, cwd


def _count_images(system: str, out: Path) -> int:
    """The PNG files the run wrote; for ours and ref, also checks that the intended code wrote them."""
    klein = system in ("ours", "ref")
    images = len(list((out / "images").glob("*.png")) if klein else list(out.glob("*.png")))
    if klein:
        version = json.loads(next((out / "meta").glob("*.json")).read_text())["versions"]["klein_ray"]
        if version.startswith("ref+") != (system == "ref"):
            raise SystemExit(f"{system}: rendered by klein_ray {version}: the wrong code ran")
    return images


def run_one(system: str, manifest: Path, out: Path, model: str, config: Path, ref_dir: Path | None = None) -> dict:
    cmd, env, cwd = _command(system, manifest, out, model, config, ref_dir)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        sys.stderr.write(str(exc.stdout or "")[-3000:] + str(exc.stderr or "")[-3000:])
        raise SystemExit(f"{system} ran past {RUN_TIMEOUT_S} s (a shared machine's other work?)") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{system} failed with exit code {proc.returncode}")
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    try:
        info = json.loads(last)
    except ValueError:
        info = {}
    return {"seconds": seconds, "images": _count_images(system, out), "info": info}


def stage_means(out: Path) -> dict:
    """Per-image means of the stage timings ours writes into meta/{id}.json, and ``steady``: the
    seconds per image between the first and the last commit (the first unit excluded), which
    start-up and shutdown cannot blur as they blur T(3N) - T(N)."""
    metas = [json.loads(meta.read_text()) for meta in (out / "meta").glob("*.json")]
    rows = [meta.get("timings", {}) for meta in metas]
    keys = {k for timings in rows for k in timings}
    means = {k: sum(timings.get(k, 0.0) for timings in rows) / max(1, len(rows)) for k in keys}
    stamps = sorted(datetime.datetime.fromisoformat(meta["created_at"]).timestamp() for meta in metas)
    return dict(means, steady=(stamps[-1] - stamps[0]) / max(1, len(stamps) - BATCH)) if stamps else means


def measure(systems, sizes, manifests, work: Path, repeats: int, run):
    """Every (system, rows) cell ``repeats`` times, interleaved. Returns the times per cell and
    each system's fastest 3N run (ours' and ref's outputs hold the per-stage timings)."""
    times: dict[tuple[str, str], list[float]] = {}
    last: dict[str, dict] = {}
    for rep in range(repeats):
        for label in sizes:
            for system in systems:
                out = work / f"out-{system}-{label}-{rep}"
                load = os.getloadavg()[0]
                r = run(system, manifests[label], out)
                if r["images"] != sizes[label]:
                    raise SystemExit(f"{system} wrote {r['images']} images for {sizes[label]} rows")
                times.setdefault((system, label), []).append(r["seconds"])
                extra = ""
                if label == "3N" and r["seconds"] < last.get(system, {}).get("seconds", float("inf")):
                    last[system] = {"out": out, "summary": r["info"], "seconds": r["seconds"]}
                if system in ("ours", "ref"):
                    extra = f" (driver.run {r['info'].get('seconds', float('nan')):.2f} s)"
                print(f"  run {rep + 1}/{repeats}  {system:<4} {label:<2} ({sizes[label]:>4} rows): "
                      f"{r['seconds']:7.2f} s{extra}   [load avg before: {load:.2f}]", flush=True)
    return times, last


def report(systems, times, last, n: int, estimator: str, repeats: int) -> None:
    combine = min if estimator == "min" else statistics.median
    res = {}
    for system in systems:
        t1, t3 = combine(times[(system, "N")]), combine(times[(system, "3N")])
        marginal = (t3 - t1) / (2 * n)
        res[system] = {"T_N": t1, "T_3N": t3, "marginal_ms": marginal * 1000, "startup_s": t1 - n * marginal}
    print(f"\n({estimator} of {repeats} run(s) per cell)")
    print(f"| system | T(N={n}) s | T(3N={3 * n}) s | marginal ms/image | start-up s |")
    print("|---|---:|---:|---:|---:|")
    for system in systems:
        r = res[system]
        print(f"| {NAMES[system]} | {r['T_N']:.2f} | {r['T_3N']:.2f} | {r['marginal_ms']:.1f} | {r['startup_s']:.2f} |")
    print()
    _report_ratios(res)
    model_ms = _report_inside(last)
    print(json.dumps({"n": n, "results": res, "model_ms_per_image": model_ms,
                      "raw": {f"{k[0]}:{k[1]}": v for k, v in times.items()}}))


def _report_ratios(res: dict) -> None:
    for mine, base in [(m, b) for m in ("ours", "ref") for b in ("A", "B", "ref") if m != b and {m, b} <= set(res)]:
        print(f"{mine}/{base}: marginal {res[mine]['marginal_ms'] / res[base]['marginal_ms']:.2f}x, "
              f"start-up {res[mine]['startup_s'] / res[base]['startup_s']:.2f}x")
    if "ours" in res and "B" in res:
        ours, b = res["ours"], res["B"]
        print(f"target marginal >= 20% below B: {'met' if ours['marginal_ms'] <= 0.8 * b['marginal_ms'] else 'NOT met'} "
              f"({1 - ours['marginal_ms'] / b['marginal_ms']:+.0%} below B); target start-up <= B: "
              f"{'met' if ours['startup_s'] <= b['startup_s'] else 'NOT met'} "
              f"({ours['startup_s']:.2f} s vs {b['startup_s']:.2f} s)")


def _report_inside(last: dict) -> dict:
    """The model call per image as each system timed it, and ours' and ref's stage means; returns
    the model call per system for the JSON line."""
    model_ms = {s: (r["summary"].get("model_ms_per_image") if s in ("A", "B")
                    else stage_means(r["out"]).get("render", float("nan")) * 1000) for s, r in last.items()}
    print("model call per image inside each system, fastest 3N run (A: pipe(), batch 1; B: pipe(), "
          "batch 4; ref, ours: KleinModel.render, batch 4, in the actor): "
          + ", ".join(f"{s} {v:.1f} ms" for s, v in model_ms.items() if v is not None))
    for system, run in ((s, r) for s, r in last.items() if s in ("ours", "ref")):
        print(f"{system} fastest 3N run: {run['seconds']:.2f} s, driver.run {run['summary'].get('seconds')} s; "
              "per image (render: its batch's model call / batch size; steady: between commits): "
              + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in sorted(stage_means(run["out"]).items())))
    return model_ms

"""The compiled path on the tiny real model, on CPU (inductor's C++ backend; 'auto' compiles only
on CUDA, ``compile: true`` asks for it anywhere): the warm-up compiles every graph a job's units
then need, the compiled model renders what the eager one does, and compile artifacts kept in
``run.compile_cache`` spare the next job its compiles. Slow: each compile takes seconds here."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from helpers import last_json, row, run_cli, write_manifest

from klein_ray.model import accel
from klein_ray.model.accel import GPUSettings, warmup_plan
from klein_ray.model.pipeline import KleinModel, RenderRequest
from klein_ray.storage import LocalStore

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture
def inductor_cache(tmp_path, monkeypatch):
    """Fresh compile caches: compiles done by earlier runs on this machine, or by earlier tests in
    this process (dynamo keeps its graphs on the block functions), must not count."""
    import torch

    torch._dynamo.reset()
    path = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def request(width: int, height: int, batch: int) -> RenderRequest:
    return RenderRequest(prompts=[f"a lamp {i}" for i in range(batch)], seeds=list(range(batch)),
                         width=width, height=height, steps=2, guidance=1.0)


def test_the_warm_up_compiles_every_graph_the_units_then_need(tiny_models, inductor_cache):
    compiled = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2, settings=GPUSettings(compile=True))
    eager = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2)
    assert compiled.settings["compile"] and not eager.settings["compile"]

    # The planner saw two sizes; units hold up to 3 rows.
    plan = warmup_plan([(64, 64, 0), (96, 64, 0)], batch=3)
    assert [(s.width, s.height, s.batch) for s in plan] == [(64, 64, 3), (96, 64, 3), (64, 64, 2), (64, 64, 1)]
    report = compiled.warm_up(plan)
    assert report["calls"] == 4 and report["graphs"] > 0 and report["compiled"] > 0

    # Units of sizes and batches the plan never named: no compile inside any of them.
    graphs = accel.compiled_graphs()
    for width, height, batch in [(128, 64, 3), (64, 128, 2), (96, 96, 1), (64, 64, 3), (160, 96, 2)]:
        ours = compiled.render(request(width, height, batch)).images
        theirs = eager.render(request(width, height, batch)).images
        for a, b in zip(ours, theirs):
            assert a.size == (width, height)
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert accel.compiled_graphs() == graphs


def test_without_compile_the_warm_up_does_nothing(tiny_models):
    model = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2)
    assert model.warm_up(warmup_plan([(64, 64, 0)], 4)) == {"calls": 0, "seconds": 0.0, "graphs": 0, "compiled": 0}


def test_compile_artifacts_spare_the_next_job_its_compiles(tmp_path, tiny_models):
    cache = tmp_path / "compile-cache"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "variants": {"tiny": {"source": str(tiny_models["tiny"]), "pipeline": "distilled",
                              "batch_size": 2, "compile": True}},
        "run": {"compile_cache": str(cache)},
    }))
    manifest = write_manifest(tmp_path / "m.parquet", [
        row(id=f"r{i}", prompt=f"a chair {i}", width=64, height=64, seed=i) for i in range(3)])

    def job(name: str) -> tuple[dict, dict]:
        # Each job in a fresh process with an empty inductor cache: only run.compile_cache links them.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"))
        proc = run_cli("--log-format", "json", "render", str(manifest), "--output", str(tmp_path / name),
                       "--config", str(config), "--executor", "local", "--no-progress", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        loaded = [e for e in events if e.get("event") == "worker_loaded"]
        assert len(loaded) == 1, proc.stderr[-3000:]
        return last_json(proc.stdout), loaded[0]

    first, loaded = job("first")
    assert first["committed"] == 3
    assert loaded["settings"]["compile"] is True
    assert loaded["warmup"]["calls"] == 2  # 64x64 at batch 2 and batch 1
    assert loaded["warmup"]["compiled"] > 0 and loaded["warmup"]["artifacts_saved"] is True
    entries = list(cache.glob("*.bin"))
    assert len(entries) == 1 and entries[0].stat().st_size > 0

    second, loaded = job("second")
    assert second["committed"] == 3
    assert loaded["warmup"]["artifacts_loaded"] is True
    assert loaded["warmup"]["compiled"] == 0 and loaded["warmup"]["artifacts_saved"] is False
    assert list(cache.glob("*.bin")) == entries
    meta = json.loads(LocalStore(tmp_path / "second").get("meta/r0.json"))
    assert meta["model"]["settings"]["compile"] is True


def test_fp8_layers_compile_and_render_what_they_render_eagerly(tiny_models, inductor_cache):
    settings = GPUSettings(compile=True, precision="fp8")
    compiled = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2, settings=settings)
    eager = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2, settings=GPUSettings(precision="fp8"))
    report = compiled.warm_up(warmup_plan([(64, 64, 0)], batch=2))
    assert report["compiled"] > 0 and compiled.accel_report["fp8"]["layers"] > 0
    for ours, theirs in zip(compiled.render(request(64, 64, 2)).images, eager.render(request(64, 64, 2)).images):
        assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 2


def test_past_the_recompile_limit_a_block_runs_eagerly_and_units_still_render(tiny_models, inductor_cache,
                                                                              monkeypatch):
    import torch

    # (the fixture reset dynamo: the count is per block function, across every model in the process)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)  # restored after
    monkeypatch.setattr(accel, "RECOMPILE_LIMIT", 1)
    compiled = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2, settings=GPUSettings(compile=True))
    eager = KleinModel.from_pretrained(str(tiny_models["tiny"]), threads=2)
    shapes = [(64, 64, 2), (96, 64, 2), (64, 64, 1), (128, 96, 3)]  # no warm-up: each would recompile
    graphs = []
    for width, height, batch in shapes:
        ours = compiled.render(request(width, height, batch)).images
        for a, b in zip(ours, eager.render(request(width, height, batch)).images):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
        graphs.append(accel.compiled_graphs())
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 3  # compiled once, then eager: no error


def test_a_kv_models_warm_up_covers_its_reference_paths(tiny_models, inductor_cache):
    """The KV pipeline's first step (extract the references' K/V) and later ones (reuse them)
    are different graphs, and references of any size vary the sequence: two-step warm-up calls
    at two sizes reach them all before a unit does."""
    from PIL import Image

    compiled = KleinModel.from_pretrained(str(tiny_models["tiny-kv"]), threads=2, settings=GPUSettings(compile=True))
    eager = KleinModel.from_pretrained(str(tiny_models["tiny-kv"]), threads=2)
    assert compiled.info.pipeline_class == "Flux2KleinKVPipeline"
    plan = warmup_plan([(64, 64, 1)], batch=2)
    assert [(s.width, s.height, s.batch, s.references) for s in plan] == [(64, 64, 2, 1), (64, 128, 2, 1), (64, 64, 1, 1)]
    assert compiled.warm_up(plan)["graphs"] > 0
    graphs = accel.compiled_graphs()
    for width, height, batch, ref_size in [(64, 64, 2, (96, 64)), (96, 64, 2, (64, 64)), (64, 96, 1, (80, 112))]:
        ref = Image.new("RGB", ref_size, (10, 200, 30))
        req = RenderRequest(prompts=[f"a lamp {i}" for i in range(batch)], seeds=list(range(batch)), width=width,
                            height=height, steps=4, guidance=1.0, references=[ref])
        for a, b in zip(compiled.render(req).images, eager.render(req).images):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert accel.compiled_graphs() == graphs

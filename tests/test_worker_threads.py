"""The render worker's threads, on the in-process executor with the tiny real pipeline: the model
is loaded and called on one thread whatever thread a unit runs on, one unit's images are encoded
while the model renders the next unit, and no more encodes run at once than the worker has CPUs.
Every test also ends on SPEC's definition of done. And the model thread itself: its calls' errors
reach the caller, and it ends with the worker that owns it. Nothing here measures or asserts a duration:
waits are bounded only so that a broken overlap fails instead of hanging.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
from helpers import assert_done, row, write_manifest

from klein_ray.config import JobConfig, RunConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.model.pipeline import KleinModel
from klein_ray.scheduling.driver import EXIT_OK, Driver, RenderJob
from klein_ray.storage import LocalStore
from klein_ray.worker import render as worker_module
from klein_ray.worker.render import RenderWorker
from klein_ray.worker.threads import ModelThread

GUARD_S = 60  # how long a test waits for an overlap before it fails (never reached when it works)


def _run(tmp_path: Path, tiny_models, rows: int, in_flight: int, factory=RenderWorker.load,
         cpus_per_actor: float | None = None):
    config = JobConfig(
        default_variant="tiny",
        variants={"tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled",
                                        batch_size=4, cpus_per_actor=cpus_per_actor)},
        run=RunConfig(in_flight_per_actor=in_flight),
    )
    manifest = write_manifest(tmp_path / "m.parquet", [
        row(id=f"r{i}", prompt=f"a product shot {i}", width=64, height=64, seed=i) for i in range(rows)])
    driver = Driver(RenderJob(str(manifest), str(tmp_path / "out"), config),
                    lambda: InProcessExecutor(factory))
    summary, code = driver.run()
    store = LocalStore(tmp_path / "out")
    assert code == EXIT_OK and summary["committed"] == rows
    for i in range(rows):
        assert_done(store, f"r{i}")
    return store


def test_the_model_is_loaded_and_called_on_one_thread_whatever_thread_runs_the_unit(
        tmp_path, tiny_models, monkeypatch):
    loaded_on, forwards, units_on = [], [], set()
    load = KleinModel.from_pretrained

    def recording_load(*args, **kwargs):
        loaded_on.append(threading.get_ident())
        return load(*args, **kwargs)

    monkeypatch.setattr(KleinModel, "from_pretrained", recording_load)

    def make(spec):
        worker = RenderWorker.load(spec)
        worker.model.pipe.transformer.register_forward_pre_hook(
            lambda module, args: forwards.append(threading.get_ident()))
        render_unit = worker.render_unit

        def recording_unit(unit):
            units_on.add(threading.get_ident())
            return render_unit(unit)
        worker.render_unit = recording_unit
        return worker

    _run(tmp_path, tiny_models, rows=12, in_flight=3, factory=make)  # 3 units, up to 3 at once
    assert len(loaded_on) == 1 and forwards
    assert set(forwards) == set(loaded_on)  # every transformer call on the thread that loaded it
    assert len(units_on) == 3 and not units_on & set(loaded_on)  # units ran on threads of their own


def test_one_units_images_are_encoded_while_the_model_renders_the_next(tmp_path, tiny_models, monkeypatch):
    # A handshake: the first encode (the first unit's: the second unit is not rendered yet)
    # waits until the second render has begun, and that render waits until the first encode
    # has begun. Both get through only if encoding runs beside the model.
    first_encode, second_render = threading.Event(), threading.Event()
    renders, seen = [], {}

    def make(spec):
        worker = RenderWorker.load(spec)
        render = worker.model.render

        def handshaking(request):
            renders.append(request.prompts)
            if len(renders) == 2:
                second_render.set()
                seen["encode_began_during_render"] = first_encode.wait(GUARD_S)
            return render(request)
        worker.model.render = handshaking
        return worker

    encode, encodes = worker_module.encode_image, []

    def handshaking_encode(image, fmt, cfg):
        encodes.append(fmt)
        if len(encodes) == 1:
            first_encode.set()
            seen["render_began_during_encode"] = second_render.wait(GUARD_S)
        return encode(image, fmt, cfg)

    monkeypatch.setattr(worker_module, "encode_image", handshaking_encode)
    _run(tmp_path, tiny_models, rows=8, in_flight=2, factory=make)  # 2 units, both given at once
    assert len(renders) == 2 and len(encodes) == 8
    assert seen == {"encode_began_during_render": True, "render_began_during_encode": True}


def test_no_more_encodes_run_at_once_than_the_worker_has_cpus(tmp_path, tiny_models, monkeypatch):
    # The first encode holds its slot until all three units are rendered, so every other
    # encode is ready to run beside it: only the pool's bound keeps them from doing so.
    lock, active, peak, renders, encodes = threading.Lock(), [0], [0], [], []
    all_rendered = threading.Event()

    def make(spec):
        worker = RenderWorker.load(spec)
        render = worker.model.render

        def counting(request):
            result = render(request)
            renders.append(request.prompts)
            if len(renders) == 3:
                all_rendered.set()
            return result
        worker.model.render = counting
        return worker

    encode = worker_module.encode_image

    def counting_encode(image, fmt, cfg):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            first = not encodes
            encodes.append(fmt)
        try:
            if first:
                assert all_rendered.wait(GUARD_S)
            return encode(image, fmt, cfg)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(worker_module, "encode_image", counting_encode)
    # One CPU for the worker: one encoder, although 3 units (12 images) are in flight at once.
    _run(tmp_path, tiny_models, rows=12, in_flight=3, factory=make, cpus_per_actor=1)
    assert len(renders) == 3 and len(encodes) == 12 and peak[0] == 1


def test_a_model_thread_raises_its_calls_errors_in_the_caller_and_ends_with_its_owner():
    model_thread = ModelThread("klein-ray-model-test")
    thread = model_thread.thread
    assert model_thread.run(threading.get_ident) == thread.ident != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        model_thread.run(lambda: 1 / 0)
    assert model_thread.run(lambda a, b=0: a + b, 1, b=2) == 3  # still serving after an error
    del model_thread
    gc.collect()
    thread.join(GUARD_S)
    assert not thread.is_alive()  # its OpenMP team goes with it


def test_a_worker_around_a_model_in_memory_commits_like_one_that_loaded_it(tmp_path, tiny_models):
    """``RenderWorker(spec, model)``: what the GPU benchmark wraps its full-size models in."""
    import json

    models = []

    def factory(spec):
        model = KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=spec.threads)
        models.append(model)
        return RenderWorker(spec, model, test_model=True, warmup={"calls": 0})

    store = _run(tmp_path, tiny_models, rows=6, in_flight=2, factory=factory)
    loaded = _run(tmp_path / "loaded", tiny_models, rows=6, in_flight=2)
    assert len(models) == 1
    for i in range(6):
        meta = json.loads(store.get(f"meta/r{i}.json"))
        assert meta["generated_by_test_model"] is True
        assert meta["image"]["sha256"] == json.loads(loaded.get(f"meta/r{i}.json"))["image"]["sha256"]

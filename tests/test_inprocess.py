"""The driver's retry policy, one failure class per test, on the in-process executor: the tiny
real pipeline renders, the ledger commits into a local OUT, and faults are injected where they
arise (the transformer's forward, the model call, the store, the executor's worker). No Ray;
each test takes seconds.

Every test ends on SPEC's definition of done: each committed row's marker names an image whose
sha256 matches, and every other row is in the errors with the reason and its attempt count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import assert_done, row, write_manifest

from klein_ray.config import JobConfig, RunConfig, VariantConfig
from klein_ray.executors.base import Executor, WorkerLost
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.output.layout import meta_key
from klein_ray.scheduling.driver import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, Driver, RenderJob
from klein_ray.scheduling.policy import MAX_LOST, MAX_ROW_FAILURES
from klein_ray.storage import LocalStore, StorageError
from klein_ray.worker.render import RenderWorker


def _config(tiny_models, batch_size: int = 4, **variants) -> JobConfig:
    return JobConfig(
        default_variant="tiny",
        variants={"tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled",
                                        batch_size=batch_size), **variants},
        run=RunConfig(in_flight_per_actor=2),
    )


def _rows(n: int, prefix: str = "r", **kw) -> list[dict]:
    # One prompt size and no references: every row fits one unit of up to batch_size rows.
    return [row(id=f"{prefix}{i}", prompt=f"a product shot {prefix}{i}", width=64, height=64,
                seed=i, **kw) for i in range(n)]


def _run(tmp_path: Path, config: JobConfig, rows: list[dict], executor=None, out_name="out"):
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / out_name
    driver = Driver(RenderJob(str(manifest), str(out), config), executor or InProcessExecutor)
    summary, code = driver.run()
    return summary, code, LocalStore(out)


def _errors(store: LocalStore) -> dict[str, dict]:
    return {e["id"]: e for e in pq.ParquetFile(store.root / "_job" / "errors.parquet").read().to_pylist()}


def _meta(store: LocalStore, row_id: str) -> dict:
    return json.loads(store.get(meta_key(row_id)))


def _factory(inject):
    """Workers built as usual, then handed to ``inject`` to plant a fault."""
    def make(spec) -> RenderWorker:
        worker = RenderWorker.load(spec)
        inject(worker)
        return worker
    return make


class _Losing(Executor):
    """The in-process executor whose worker dies under chosen units before they run (a killed
    process, a lost node), and optionally stays dead (Ray out of restarts)."""

    def __init__(self, lose, dies_for_good: bool = False):
        self.inner, self.lose, self.for_good = InProcessExecutor(), lose, dies_for_good
        self.lost: list = []

    def cluster_cpus(self):
        return self.inner.cluster_cpus()

    def start_pool(self, spec, count, num_cpus, num_gpus):
        return self.inner.start_pool(spec, count, num_cpus, num_gpus)

    def wait_ready(self, pools, timeout, stop):
        return self.inner.wait_ready(pools, timeout, stop)

    def submit(self, pool, unit):
        if not self.lose(unit):
            return self.inner.submit(pool, unit)
        self.lost.append(unit)
        if self.for_good:
            pool.dead.add(pool.least_loaded())

    @property
    def in_flight(self):
        return self.inner.in_flight + len(self.lost)

    def collect(self, timeout):
        lost, self.lost = self.lost, []
        done = self.inner.collect(0 if lost else timeout)
        return [(u, WorkerLost("injected: the worker process was killed")) for u in lost] + done

    def shutdown_pool(self, pool):
        self.inner.shutdown_pool(pool)

    def shutdown(self, pools):
        self.inner.shutdown(pools)


def test_out_of_memory_halves_the_batch_until_it_fits(tmp_path, tiny_models):
    batches = []

    def oom_over_one_image(worker):
        import torch

        def hook(module, args, kwargs):
            batch = kwargs["hidden_states"].shape[0]
            batches.append(batch)
            if batch > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        worker.model.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)

    summary, code, store = _run(tmp_path, _config(tiny_models), _rows(4),
                                lambda: InProcessExecutor(_factory(oom_over_one_image)))
    assert code == EXIT_OK and summary["committed"] == 4
    # 4 -> 2 + 2 -> 1 + 1 + 1 + 1: each row rendered alone at its third attempt.
    assert sorted(set(batches)) == [1, 2, 4]
    for i in range(4):
        meta = assert_done(store, f"r{i}")
        assert meta["attempt"] == 3 and meta["batch"]["size"] == 1


def test_a_poisonous_row_is_isolated_and_fails_alone(tmp_path, tiny_models):
    def poison(worker):
        render = worker.model.render

        def guarded(request):
            if any("POISON" in p for p in request.prompts):
                raise RuntimeError("the pipeline crashed on this prompt (injected)")
            return render(request)
        worker.model.render = guarded

    rows = _rows(3) + [row(id="bad", prompt="a POISON pill", width=64, height=64, seed=9)]
    summary, code, store = _run(tmp_path, _config(tiny_models), rows,
                                lambda: InProcessExecutor(_factory(poison)))
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (3, 1)
    for i in range(3):
        assert assert_done(store, f"r{i}")["attempt"] == 2  # once in the batch, then alone
    error = _errors(store)["bad"]
    assert (error["stage"], error["error_type"]) == ("render", "RuntimeError")
    assert "crashed on this prompt" in error["message"]
    assert error["attempts"] == 1 + MAX_ROW_FAILURES  # the batch, then alone until the limit
    assert store.head(meta_key("bad")) is None


def test_a_unit_whose_worker_is_lost_runs_again_whole(tmp_path, tiny_models):
    lost_once = set()

    def lose_first_submission(unit):
        if unit.unit_id in lost_once:
            return False
        lost_once.add(unit.unit_id)
        return True

    summary, code, store = _run(tmp_path, _config(tiny_models), _rows(4),
                                lambda: _Losing(lose_first_submission))
    assert code == EXIT_OK and summary["committed"] == 4
    for i in range(4):
        meta = assert_done(store, f"r{i}")
        assert meta["attempt"] == 2 and meta["batch"]["size"] == 4  # whole, not split


def test_a_unit_that_keeps_killing_workers_is_split_and_the_culprit_fails(tmp_path, tiny_models):
    def lose_with_culprit(unit):
        return any(r.id == "killer" for r in unit.rows)

    rows = _rows(2) + [row(id="killer", prompt="a vase", width=64, height=64, seed=5)]
    summary, code, store = _run(tmp_path, _config(tiny_models), rows,
                                lambda: _Losing(lose_with_culprit))
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (2, 1)
    for i in range(2):
        assert assert_done(store, f"r{i}")["attempt"] == MAX_LOST + 1  # alone, after the split
    error = _errors(store)["killer"]
    assert (error["stage"], error["error_type"]) == ("render", "WorkerLost")
    assert error["attempts"] == MAX_LOST + 1


def test_rows_fail_when_every_worker_is_gone_for_good(tmp_path, tiny_models):
    summary, code, store = _run(tmp_path, _config(tiny_models, batch_size=2), _rows(4),
                                lambda: _Losing(lambda unit: True, dies_for_good=True))
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (0, 4)
    errors = _errors(store)
    assert {e["error_type"] for e in errors.values()} == {"ModelLoadError"}
    assert all("died" in e["message"] for e in errors.values())


def test_a_variant_that_will_not_load_fails_its_rows_and_the_others_render(tmp_path, tiny_models, caplog):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["tiny"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    loads = []

    def counting(spec):
        loads.append(spec.variant)
        return RenderWorker.load(spec)

    config = _config(tiny_models, broken=VariantConfig(source=str(broken)))
    config = config.model_copy(update={"run": RunConfig(in_flight_per_actor=2, model_load_attempts=2)})
    with caplog.at_level(logging.ERROR, logger="klein_ray"):
        summary, code, store = _run(tmp_path, config, _rows(2) + _rows(2, "b", variant="broken"),
                                    lambda: InProcessExecutor(counting))
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (2, 2)
    assert sorted(loads) == ["broken", "broken", "tiny"]  # two tries for the broken one
    assert_done(store, "r0") and assert_done(store, "r1")
    errors = _errors(store)
    assert sorted(errors) == ["b0", "b1"]
    assert {e["error_type"] for e in errors.values()} == {"ModelLoadError"}
    assert "failed to load after 2 attempt(s)" in errors["b0"]["message"]
    assert any("variant 'broken' failed to load" in r.getMessage() for r in caplog.records)


def test_a_transient_store_failure_is_retried_and_the_row_commits(tmp_path, tiny_models):
    def flaky_once(worker):
        store, failed = worker.ledger.store, set()
        put = store.put

        def put_once_failing(key, data, **kw):
            if key.startswith("images/r1.") and key not in failed:
                failed.add(key)
                raise StorageError("put images/r1.png: 503 SlowDown (injected)")
            return put(key, data, **kw)
        store.put = put_once_failing

    summary, code, store = _run(tmp_path, _config(tiny_models), _rows(3),
                                lambda: InProcessExecutor(_factory(flaky_once)))
    assert code == EXIT_OK and summary["committed"] == 3
    assert assert_done(store, "r1")["attempt"] == 2 and assert_done(store, "r0")["attempt"] == 1


def test_a_row_that_cannot_be_stored_fails_after_its_retries(tmp_path, tiny_models):
    out = tmp_path / "out"
    (out / "images" / "r1.png").mkdir(parents=True)  # a directory where the image must go
    summary, code, store = _run(tmp_path, _config(tiny_models), _rows(3))
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (2, 1)
    error = _errors(store)["r1"]
    assert error["stage"] == "store" and error["attempts"] == MAX_ROW_FAILURES
    assert store.head(meta_key("r1")) is None
    assert_done(store, "r0") and assert_done(store, "r2")


def test_a_missing_reference_fails_its_rows_without_retrying(tmp_path, tiny_models):
    rows = _rows(2) + _rows(2, "e", references=[str(tmp_path / "nope.png")])
    summary, code, store = _run(tmp_path, _config(tiny_models), rows)
    assert code == EXIT_ROWS_FAILED and (summary["committed"], summary["failed"]) == (2, 2)
    errors = _errors(store)
    assert {(e["stage"], e["attempts"]) for e in errors.values()} == {("fetch", 1)}


def test_an_interrupted_run_keeps_what_landed_and_a_rerun_finishes_once(tmp_path, tiny_models):
    class Interrupting(InProcessExecutor):
        driver: Driver | None = None

        def collect(self, timeout):
            done = super().collect(timeout)
            if done and self.driver is not None:
                self.driver._on_signal(2, None)  # what SIGINT does, at a moment we choose
                self.driver = None  # once: a second SIGINT means "abandon at once"
            return done

    manifest = write_manifest(tmp_path / "m.parquet", _rows(8))
    out = tmp_path / "out"
    executor = Interrupting()
    first = Driver(RenderJob(str(manifest), str(out), _config(tiny_models, batch_size=2)), lambda: executor)
    executor.driver = first
    summary, code = first.run()
    assert code == EXIT_INTERRUPTED and summary["interrupted"]
    assert 0 < summary["committed"] < 8 and summary["failed"] == 0
    landed = {i for i in range(8) if LocalStore(out).head(meta_key(f"r{i}"))}
    assert len(landed) == summary["committed"]

    again = Driver(RenderJob(str(manifest), str(out), _config(tiny_models, batch_size=2)), InProcessExecutor)
    summary, code = again.run()
    assert code == EXIT_OK and summary["committed"] + summary["skipped"] == 8
    assert summary["committed"] == 8 - len(landed)
    store = LocalStore(out)
    for i in range(8):
        assert_done(store, f"r{i}")
    assert sum(1 for _ in store.list("images/")) == 8


@pytest.mark.subprocess
def test_render_with_the_local_executor_needs_no_ray(tmp_path, tiny_models):
    """`klein-ray render --executor local`: the same job, workers on threads of the CLI process."""
    from helpers import last_json, run_cli, write_config

    manifest = write_manifest(tmp_path / "m.parquet", _rows(3) + [
        row(id="base-1", prompt="a bowl", variant="tiny-base", width=64, height=64, seed=4)])
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out = tmp_path / "out"
    args = ("render", str(manifest), "--output", str(out), "--config", str(config), "--no-progress")
    # A Ray address that answers nothing: a run that tried to use Ray would fail.
    proc = run_cli(*args, "--executor", "local", env=dict(os.environ, RAY_ADDRESS="127.0.0.1:9"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc.stdout)["committed"] == 4
    assert "Traceback" not in proc.stderr and "Loading" not in proc.stderr  # no progress bars
    store = LocalStore(out)
    for row_id in ("r0", "r1", "r2", "base-1"):
        assert_done(store, row_id)
    assert last_json(run_cli(*args, "--executor", "local").stdout)["skipped"] == 4  # resumes
    refused = run_cli(*args, "--executor", "local", "--address", "127.0.0.1:6379")
    assert refused.returncode == 2 and "--address" in refused.stderr


def test_tasks_run_beside_the_workers_in_order_with_their_errors():
    """``map_tasks``: what exports and sharded verifies run through the executor seam."""
    executor = InProcessExecutor()
    try:
        assert list(executor.map_tasks(lambda n: n * n, range(20), in_flight=3)) == [n * n for n in range(20)]
        results = executor.map_tasks(lambda n: 1 // n, [1, 0, 2], in_flight=2)
        assert next(results) == 1
        with pytest.raises(ZeroDivisionError):
            next(results)
    finally:
        executor.shutdown([])

"""What an operator sees, in-process (fast): the usual mistakes get the advice that fits them,
waits say what they wait for, and status, progress and the summary agree with what was done.
(Before: `status` on S3 without the endpoint said nothing for 281 s and exited 75; relative
references were taken from the working directory; the default model was looked for wherever
the command ran, failing every row; sizes from references were rounded silently; a SIGKILLed
run stayed "running" in `status`; progress.json was missing while models loaded; a finished
run's per-variant `pending` was its committed count; SIGTERM gave 130 with nothing left to do;
the summary had no `remaining`; typos got no suggestion.)"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from localrun import job, manifest, render, rows, shared_worker
from PIL import Image

from klein_ray.cli import main
from klein_ray.commands.status import output_status
from klein_ray.output.layout import LEASE, PROGRESS, meta_key
from klein_ray.storage import LocalStore


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- storage that never answered ------------------------------------------------------------


def test_an_s3_endpoint_that_never_answered_is_a_configuration_problem(tmp_path, capsys, monkeypatch):
    from klein_ray.storage import reset_clients

    for name, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    reset_clients()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "job.yaml"
    config.write_text(f"storage: {{endpoint_url: 'http://127.0.0.1:{port}', max_attempts: 1, "
                      "connect_timeout: 1, outer_retry_seconds: 30}\n")
    started = time.monotonic()
    code, _, err = _cli(capsys, "status", "s3://bucket/out", "--config", str(config))
    assert code == 2, err
    assert f"127.0.0.1:{port} never answered" in err and "storage.endpoint_url" in err
    assert time.monotonic() - started < 15  # not the 30 s of retries an outage gets


def test_the_first_storage_failure_is_said_at_once(tmp_path, moto_s3, s3_env, caplog):
    from faultproxy import FaultProxy

    from klein_ray.config import StorageConfig
    from klein_ray.storage import open_store
    from klein_ray.storage.base import StorageUnavailable

    s3_env(moto_s3)
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint, rate=1.0, faults=("slowdown",)) as proxy:
        store = open_store(f"s3://{bucket}/out", StorageConfig(endpoint_url=proxy.url, max_attempts=1,
                                                                outer_retry_seconds=1.5))
        with caplog.at_level(logging.WARNING, logger="klein_ray"), pytest.raises(StorageUnavailable):
            store.get("x")
    assert "did not answer" in caplog.text and "retrying for up to" in caplog.text


# -- paths, models, sizes, suggestions --------------------------------------------------------


def test_relative_references_are_taken_from_the_manifest_directory(tmp_path, tiny_models, monkeypatch):
    catalog = tmp_path / "catalog"
    (catalog / "refs").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(catalog / "refs" / "mug.png")
    uri = manifest(catalog / "m.parquet", [
        {"id": "edit", "prompt": "the mug", "width": 64, "height": 64, "references": ["refs/mug.png"]},
        {"id": "typo", "prompt": "the mug", "width": 64, "height": 64, "references": ["refs/mgu.png"]}])
    monkeypatch.chdir(tmp_path)  # elsewhere: before, "refs/mug.png" was looked for here
    out = tmp_path / "out"
    summary, code = render(uri, str(out), job(tiny_models))
    assert code == 1 and summary["committed"] == 1
    (error,) = pq.ParquetFile(out / "_job" / "errors.parquet").read().to_pylist()
    assert error["id"] == "typo" and "not found" in error["message"] and "local_roots" not in error["message"]


def test_without_a_config_a_missing_default_model_is_exit_2_with_what_to_do(tmp_path, capsys, monkeypatch):
    uri = manifest(tmp_path / "m.parquet", rows(1))
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "render", uri, "--output", str(tmp_path / "out"), "--executor", "local",
                        "--no-progress")
    assert code == 2 and "make-tiny-model .cache/tiny-klein" in err and "--config" in err
    assert not (tmp_path / "out" / "images").exists()


def test_a_size_taken_from_a_reference_and_adjusted_is_said_in_the_metadata(tmp_path, tiny_models):
    Image.new("RGB", (100, 75), (10, 120, 200)).save(tmp_path / "odd.png")
    uri = manifest(tmp_path / "m.parquet", [{"id": "odd", "prompt": "x", "references": ["odd.png"]}])
    out = tmp_path / "out"
    assert render(uri, str(out), job(tiny_models))[1] == 0
    meta = json.loads(LocalStore(out).get(meta_key("odd")))
    assert (meta["width"], meta["height"]) == (96, 64)
    assert any("size taken from the first reference (100x75) and rendered at 96x64" in w for w in meta["warnings"])


def test_mistakes_get_suggestions(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("variants:\n  tiny: {source: ./m, batch_szie: 4}\nrun: {in_flight_per_actr: 2}\n")
    code, _, err = _cli(capsys, "validate", str(tmp_path / "m.parquet"), "--config", str(config))
    assert code == 2 and "did you mean 'batch_size'" in err and "did you mean 'in_flight_per_actor'" in err
    pq.write_table(pa.table({"id": ["a"], "promt": ["x"]}), tmp_path / "m.parquet")
    code, _, err = _cli(capsys, "validate", str(tmp_path / "m.parquet"))
    assert code == 2 and "the file has 'id', 'promt'" in err and "did you mean 'promt'" in err
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"], "references": ["s3://b/a.png"]}), tmp_path / "m.parquet")
    code, _, err = _cli(capsys, "validate", str(tmp_path / "m.parquet"))
    assert code == 2 and "as a list, even of one" in err


# -- status, progress, summary -----------------------------------------------------------------


def test_a_run_whose_lease_is_gone_is_interrupted_not_running(tmp_path, tiny_models):
    out = tmp_path / "out"
    assert render(manifest(tmp_path / "m.parquet", rows(2)), str(out), job(tiny_models))[1] == 0
    store = LocalStore(out)
    progress = json.loads(store.get(PROGRESS))
    store.put(PROGRESS, json.dumps(dict(progress, state="running")).encode())  # its last word
    st = output_status(str(out))  # and its lease says released: it is not running
    assert st.progress["state"] == "interrupted" and "released" in st.progress["why"]
    lease = json.loads(store.get(LEASE))
    store.put(LEASE, json.dumps(dict(lease, released=False, written_at=time.time() - 3600)).encode())
    st = output_status(str(out))
    assert st.progress["state"] == "interrupted" and "last renewed" in st.progress["why"]


def test_progress_is_there_while_models_load_and_says_what_is_left_at_the_end(tmp_path, tiny_models):
    out = tmp_path / "out"
    seen, release = [], threading.Event()

    def slow_to_load(spec):
        seen.append(json.loads(LocalStore(out).get(PROGRESS)))  # written before any worker loads
        release.wait(30)
        return shared_worker(spec)

    table = rows(5)
    table[4]["width"] = 63  # invalid: fails validation
    uri = manifest(tmp_path / "m.parquet", table)
    threading.Timer(0.2, release.set).start()
    summary, code = render(uri, str(out), job(tiny_models), factory=slow_to_load)
    assert code == 1 and seen and seen[0]["state"] == "loading"
    assert summary["remaining"] == 0 and summary["failed"] == 1 and summary["committed"] == 4
    final = json.loads(LocalStore(out).get(PROGRESS))
    assert final["state"] == "finished" and final["variants"]["tiny"]["pending"] == 0
    assert final["variants"]["tiny"]["to_render"] == 5 and final["variants"]["tiny"]["committed"] == 4


def test_a_failed_run_ends_by_saying_where_the_errors_are(tmp_path, tiny_models, caplog):
    table = rows(2)
    table[1]["prompt"] = ""
    with caplog.at_level(logging.ERROR, logger="klein_ray"):
        render(manifest(tmp_path / "m.parquet", table), str(tmp_path / "out"), job(tiny_models))
    assert "_job/errors.parquet" in caplog.text and "_job/report.html" in caplog.text


def test_an_interrupt_when_nothing_is_left_to_do_changes_nothing(tmp_path, tiny_models):
    """The stop arrives as the last unit's outcome is on its way back: every row is committed,
    so the run ends 0, not 130."""
    from klein_ray.executors.inprocess import InProcessExecutor
    from klein_ray.scheduling.driver import Driver, RenderJob

    holder = {}

    def interrupts_after_the_last_unit(spec):
        worker = shared_worker(spec)
        render_unit = worker.render_unit

        def then_interrupt(unit):
            outcome = render_unit(unit)
            holder["driver"]._on_signal(15, None)
            return outcome

        worker.render_unit = then_interrupt
        return worker

    uri = manifest(tmp_path / "m.parquet", rows(2))  # one unit of two rows
    driver = Driver(RenderJob(uri, str(tmp_path / "out"), job(tiny_models)),
                    lambda: InProcessExecutor(interrupts_after_the_last_unit))
    holder["driver"] = driver
    summary, code = driver.run()
    assert summary["interrupted"] and summary["committed"] == 2 and summary["remaining"] == 0
    assert code == 0

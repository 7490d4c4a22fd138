"""Two writers on one output, end to end through the CLI (`--executor local`: no Ray, real tiny
model, real files): a driver frozen past its lease and woken while another runs stops with a
clear message and exit 75, the other finishes, and nothing is lost, duplicated or broken; and
`render --verify` repairs what `verify` finds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_done, last_json, lease_released, row, run_cli, write_config, write_manifest

from klein_ray.storage import LocalStore

TTL = 4.0


def _rows(n: int, prefix: str) -> list[dict]:
    return [row(id=f"{prefix}{i:03d}", prompt=f"a product shot {i}", width=64, height=64, seed=i)
            for i in range(n)]


def _local_job(tmp_path: Path, tiny_models, rows: list[dict], **config) -> tuple[tuple[str, ...], Path]:
    """The CLI arguments of a render of ``rows`` into ``tmp_path/out`` without Ray, and OUT."""
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    job = write_config(tmp_path / "job.yaml", tiny_models, **config)
    out = tmp_path / "out"
    return ("render", str(manifest), "--output", str(out), "--config", str(job), "--no-progress",
            "--executor", "local"), out


def _lease(out: Path) -> dict | None:
    try:
        return json.loads((out / "_job" / "lease.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _wait(predicate, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Poll a condition on the files (what we wait for is another process's progress)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _start(args, prefix: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "klein_ray", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _other_container() -> list[str]:
    """A PID namespace of its own, as a driver in another container on this host would have: its
    pid says nothing about ours, so only the lease's TTL can tell it we are gone."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("unshare --pid is not available here")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.mark.subprocess
def test_a_frozen_driver_woken_while_another_runs_stops_and_nothing_breaks(tmp_path, tiny_models):
    rows = _rows(80, "f")
    args, out = _local_job(tmp_path, tiny_models, rows, run={"lease_ttl_s": TTL},
                           variants={"tiny": {"source": str(tiny_models["tiny"]), "pipeline": "distilled",
                                              "actors": 1, "batch_size": 1}})
    first = _start(args)
    _wait(lambda: len(list((out / "meta").glob("*.json"))) >= 5, first)
    first_run = _lease(out)["run_id"]
    first.send_signal(signal.SIGSTOP)  # a long GC pause, a frozen VM, a partition
    try:
        second = _start(args, prefix=_other_container())
        _wait(lambda: (_lease(out) or {}).get("run_id") not in (None, first_run), second)
    finally:
        first.send_signal(signal.SIGCONT)  # woken while the second runs
    woke = time.monotonic()
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode == 75, err1[-3000:]
    assert "lost the output's lease" in err1 and "Traceback" not in err1
    assert time.monotonic() - woke < TTL + 10  # within about one renewal interval, plus the grace
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2[-3000:]
    assert "waiting up to" in err2  # it watched the lease on its own clock, then took it over

    store = LocalStore(out)
    for r in rows:
        assert_done(store, r["id"])
    assert sorted(o.key for o in store.list("images/")) == sorted(f"images/{r['id']}.png" for r in rows)
    verify = run_cli("verify", str(out), "--deep")
    assert verify.returncode == 0, verify.stdout[-2000:]
    assert lease_released(out)
    summary = json.loads((out / "_job" / "summary.json").read_text())
    assert summary["run_id"] != first_run  # the woken driver wrote nothing under _job/ after losing


def _job_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "_job").rglob("*")) if p.is_file()}


@pytest.mark.subprocess
@pytest.mark.parametrize("where", ["same-host", "other-container"])
def test_a_driver_woken_after_another_finished_and_released_writes_nothing(tmp_path, tiny_models, where):
    """Driver A is frozen mid-run; B waits out the TTL (on this host too: A's pid is alive but
    not renewing), takes over, finishes and releases. Woken, A must exit 75 having written
    nothing: no lease recreated, no summary, progress, errors or report rewritten. (Before: A
    recreated the lease B had released and rewrote the job's files, exit 0; and on the same host
    B was refused at once, exit 2, for as long as A stayed stopped.)"""
    rows = _rows(40, "w")
    args, out = _local_job(tmp_path, tiny_models, rows, run={"lease_ttl_s": TTL},
                           variants={"tiny": {"source": str(tiny_models["tiny"]), "pipeline": "distilled",
                                              "actors": 1, "batch_size": 1}})
    first = _start(args)
    _wait(lambda: len(list((out / "meta").glob("*.json"))) >= 5, first)
    first_run = _lease(out)["run_id"]
    first.send_signal(signal.SIGSTOP)
    try:
        second = _start(args, prefix=_other_container() if where == "other-container" else None)
        out2, err2 = second.communicate(timeout=300)
        assert second.returncode == 0, err2[-3000:]
        assert "not renewed" in err2 and "taking it over" in err2
        released = _lease(out)
        assert released["released"] and released["run_id"] != first_run and released["epoch"] == 2
        before = _job_files(out)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode == 75, err1[-3000:]
    assert "lost the output's lease" in err1 and "Traceback" not in err1
    assert _job_files(out) == before  # not a byte more under _job/, the lease record included
    store = LocalStore(out)
    for r in rows:
        assert_done(store, r["id"])
    assert run_cli("verify", str(out), "--deep").returncode == 0


@pytest.mark.subprocess
def test_render_verify_repairs_what_verify_finds(tmp_path, tiny_models):
    rows = _rows(6, "v")
    args, out = _local_job(tmp_path, tiny_models, rows)
    assert run_cli(*args).returncode == 0
    (out / "images" / "v000.png").unlink()  # lost
    (out / "images" / "v001.png").write_bytes(b"rot")  # damaged behind our back
    (out / "meta" / "v002.json").write_text("{")  # marker damaged

    found = run_cli("verify", str(out))
    assert found.returncode == 1
    assert {line.split("\t")[0] for line in found.stdout.strip().splitlines()[:-1]} == {"v000", "v001", "v002"}
    plain = run_cli(*args)  # a plain resume trusts the checkpoint: nothing rendered
    assert last_json(plain.stdout)["committed"] == 0

    repaired = run_cli(*args, "--verify")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert last_json(repaired.stdout)["committed"] == 3
    assert run_cli("verify", str(out), "--deep").returncode == 0
    store = LocalStore(out)
    for r in rows:
        assert_done(store, r["id"])


@pytest.mark.subprocess
def test_a_marker_without_its_image_is_not_taken_for_done(tmp_path, tiny_models):
    """Rows committed after the last checkpoint part are found by the worker's marker check;
    it trusted the marker alone, so a row whose image was lost stayed 'done' for ever."""
    rows = _rows(4, "m")
    args, out = _local_job(tmp_path, tiny_models, rows)
    assert run_cli(*args).returncode == 0
    shutil.rmtree(out / "_job" / "results")  # as if the driver died before flushing its checkpoint
    (out / "images" / "m002.png").unlink()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (last_json(resumed.stdout)["committed"], last_json(resumed.stdout)["skipped"]) == (1, 3)
    assert run_cli("verify", str(out), "--deep").returncode == 0

"""A stop whose interrupt a library swallowed is still a stop.

SIGTERM and SIGINT raise ``KeyboardInterrupt`` until the driver's own handler takes over, and a
library may swallow it: pyarrow's lazy import of pandas did, and a job told to stop half a
second after it started rendered every row and exited 0 (or exited 1 on a half-imported
pandas). The handler remembers the stop; these tests swallow the interrupt themselves, at the
moments that matter, and check the stop still ends the run: exit 130, the summary, the lease
released, nothing rendered. No sleeps: the signal is raised in the test's own thread.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest
from helpers import lease_released
from localrun import job, manifest, rows, shared_worker

from klein_ray import startup
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.scheduling.driver import Driver, RenderJob


@pytest.fixture
def stop_handlers(monkeypatch):
    """The CLI's first handlers, with a memory of stops of this test's own."""
    monkeypatch.setattr(startup, "_ASKED", threading.Event())
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    startup.own_stop_signals()
    yield
    for sig, handler in old.items():
        signal.signal(sig, handler)


def swallowed(sig: int = signal.SIGTERM) -> None:
    """What pyarrow's pandas import did to a stop: its interrupt raised, and lost."""
    try:
        signal.raise_signal(sig)
    except KeyboardInterrupt:
        pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_swallowed_before_the_driver_took_over_still_ends_the_run(tmp_path, tiny_models, stop_handlers,
                                                                       sig):
    out = tmp_path / "out"
    driver = Driver(RenderJob(manifest(tmp_path / "m.parquet", rows(4)), str(out), job(tiny_models)),
                    lambda: InProcessExecutor(shared_worker))
    prepare = driver.prepare

    def stopped_while_planning(m):  # holding the lease: the moment a lost stop costs the most
        plan = prepare(m)
        swallowed(sig)
        return plan

    driver.prepare = stopped_while_planning  # type: ignore[method-assign]
    summary, code = driver.run()
    assert code == 130 and summary["interrupted"] is True
    assert summary["committed"] == 0 and summary["remaining"] == 4
    assert not (out / "meta").exists() or not any((out / "meta").iterdir())
    assert lease_released(out)


def test_a_failure_after_a_swallowed_stop_is_the_stop(tmp_path, stop_handlers, monkeypatch, capsys):
    """The stop left a library half-imported and the next call failed: `render` says it was
    interrupted (130, its summary line), not a traceback and exit 1."""
    import klein_ray.cli as cli

    def broken_by_the_stop(*args, **kwargs):
        swallowed()
        raise AttributeError("partially initialized module 'pandas' has no attribute '_pandas_datetime_CAPI'")

    monkeypatch.setattr(cli, "render", broken_by_the_stop)
    code = cli.main(["render", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 130
    assert json.loads(captured.out.strip().splitlines()[-1])["interrupted"] is True
    assert "interrupted" in captured.err and "Traceback" not in captured.err


def test_a_failure_with_no_stop_asked_is_not_disguised_as_one(tmp_path, stop_handlers, monkeypatch):
    import klein_ray.cli as cli

    def broken(*args, **kwargs):
        raise AttributeError("a real bug")

    monkeypatch.setattr(cli, "render", broken)
    with pytest.raises(AttributeError, match="a real bug"):
        cli.main(["render", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out")])

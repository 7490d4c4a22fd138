"""The CLI's exit status is the command's own, whatever a native library does at teardown.

pyarrow's Parquet readers keep C++ threads; one still alive while the interpreter is torn down
aborted `klein-ray verify` after it had printed "0 broken" (exit -6, about once in 40 runs on a
loaded machine). The race is not ours to time, so these tests force its outcome: a library
object that aborts the process when the interpreter's teardown destroys it. The command's
status must stand, and what Python's exit does that a user relies on must still happen: exit
functions run, a thread still writing finishes, a thread pool left open does not hang the exit;
a stop that arrives while the exit waits on a thread ends the wait, not the status.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO

from klein_ray.scheduling.driver import EXIT_INVALID

pytestmark = pytest.mark.subprocess

# A process that runs the CLI as `klein-ray` does, after leaving behind what a library might.
_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    tmp = Path(sys.argv[1])

    class DiesInTeardown:  # a native library's object that aborts when torn down at exit
        def __del__(self):
            os.abort()

    LIBRARY_STATE = DiesInTeardown()
    atexit.register((tmp / "exit-function-ran").touch)
    POOL = ThreadPoolExecutor(2)  # left open, as a library may leave one
    POOL.submit(lambda: None).result()

    def finish_writing():
        time.sleep(0.5)  # (still writing when the command returns; not a timing of the test)
        (tmp / "thread-finished").touch()

    threading.Thread(target=finish_writing).start()
    {extra}

    sys.argv = ["klein-ray", "verify", str(tmp / "not-an-output")]
    from klein_ray.__main__ import {entry}
    sys.exit({entry}())
""")


# A thread that never ends, and stops the process once the exit is waiting on it (the main
# thread is marked ended when Python's thread shutdown begins): the stop lands in the wait.
_STOPS_THE_WAIT = textwrap.dedent("""
    import signal
    def stop_the_wait():
        while threading.main_thread().is_alive():
            time.sleep(0.01)  # (polls a state; the order is forced by the state, not the time)
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait()
    threading.Thread(target=stop_the_wait).start()
""")


def _run(tmp_path: Path, entry: str, extra: str = "") -> subprocess.CompletedProcess:
    script = _SCRIPT.replace("{entry}", entry).replace("{extra}", extra)
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_library_that_aborts_in_teardown_does_not_change_the_exit_status(tmp_path):
    done = _run(tmp_path, "entry")
    assert done.returncode == EXIT_INVALID, done.stderr[-2000:]  # verify's own: no output there
    assert "no klein-ray output" in done.stderr
    assert (tmp_path / "exit-function-ran").exists()
    assert (tmp_path / "thread-finished").exists()


def test_without_the_cli_s_exit_the_same_process_aborts(tmp_path):
    """The control: the command alone, left to Python's exit, is killed by the teardown."""
    done = _run(tmp_path, "command")
    assert done.returncode == -6, (done.returncode, done.stderr[-2000:])
    assert "no klein-ray output" in done.stderr  # the command had finished and said so


def test_a_stop_while_the_exit_waits_on_a_thread_ends_the_wait_not_the_status(tmp_path):
    done = _run(tmp_path, "entry", _STOPS_THE_WAIT)
    assert done.returncode == EXIT_INVALID, done.stderr[-2000:]
    assert (tmp_path / "exit-function-ran").exists()

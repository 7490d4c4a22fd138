"""How a run stops before every row is settled, and the exit codes a run ends with.

Three causes, one mechanism. An interrupt (SIGINT, SIGTERM: exit 130); an abort asked for by
other code from any thread (``Driver.abort``: e.g. the output's lease was lost); an output store
that cannot be reached (``OutageWatch``: exit 75). Each becomes a ``Stop`` and the first one
wins: the driver issues no more work, lets units in flight settle for ``STOP_GRACE_S`` and
returns the stop's exit code. Rows not settled by then are not failures: they are simply not
done, and re-running the same command renders them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from klein_ray.executors.base import Outcome, WorkerFailed
from klein_ray.storage.base import StorageUnavailable
from klein_ray.types import RowError, UnitOutcome, first_line

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: nothing is wrong with the job; run it again later
STOP_GRACE_S = 5.0  # how long units in flight may take to land once a run stops
TRY_LATER = "nothing is lost, run the same command again later"


@dataclass(frozen=True)
class Stop:
    """Why a run stops early and how it ends."""

    reason: str
    exit_code: int
    write_log: bool = True  # False: write nothing more under OUT/_job (job log, checkpoint)
    offline: bool = False  # the output store is unreachable: not even the lease waits for it


INTERRUPT = Stop("interrupted", EXIT_INTERRUPTED)  # SIGINT / SIGTERM; says so itself, and in the summary


class Stops:
    """The first stop asked for, from whichever thread asked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first: Stop | None = None

    def request(self, stop: Stop) -> bool:
        """Record ``stop`` unless one came first; True if it is the one that counts."""
        with self._lock:
            if self.first is None:
                self.first = stop
                return True
            return False


def unreachable(error: RowError) -> bool:
    """A row whose store failed because the storage could not be reached after every retry
    (connection errors, timeouts, 5xx), as opposed to being refused (403, a bad key)."""
    return error.stage == "store" and error.error_type == StorageUnavailable.__name__


class OutageWatch:
    """Tells an output store that is gone from one that is flaky, from the outcomes of units.

    Evidence is a row that could not be stored because the storage was unreachable after every
    retry of the storage layer. One such row is not enough: others may still commit. The store
    counts as gone once there is evidence and no row has committed for ``window`` seconds (since
    the last commit, or since rendering began). The evidence itself arrives only after
    ``storage.outer_retry_seconds`` of failing, so in a real outage the window has long passed
    by then and the run stops at once; with short storage retries, at most ``window`` later.
    """

    def __init__(self, window: float):
        self.window = window
        self.last_ok = time.monotonic()
        self.evidence: str | None = None  # the first unreachable error since the last commit

    def observe(self, outcome: Outcome) -> None:
        if isinstance(outcome, UnitOutcome):
            if outcome.results:  # committed, or found committed: the store answered
                self.last_ok, self.evidence = time.monotonic(), None
            for error in outcome.errors:
                if unreachable(error) and self.evidence is None:
                    self.evidence = error.message
        elif isinstance(outcome, WorkerFailed) and isinstance(outcome.cause, StorageUnavailable):
            self.evidence = self.evidence or first_line(outcome.cause)

    def gone(self) -> str | None:
        """The evidence, once the store counts as gone; None while it may still be there."""
        if self.evidence is not None and time.monotonic() - self.last_ok >= self.window:
            return self.evidence
        return None


def trap_signals(handler) -> dict:
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. embedded use)
            pass
    return old


def restore_signals(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def run_state(stop: Stop | None) -> str:
    """How a run ended, in words (progress.json's ``state``)."""
    return "finished" if stop is None else "interrupted" if stop is INTERRUPT else "stopped"


def quietly(fn: Callable[[], object]) -> None:
    """``fn()`` on the way out with the store unreachable: best effort, never raises."""
    try:
        fn()
    except Exception:
        log.debug("%s failed on the way out", getattr(fn, "__name__", fn), exc_info=True)

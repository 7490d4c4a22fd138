"""Stops that arrive before a command's own handling of them: the first handler of SIGTERM and
SIGINT, the memory that one arrived, and what a command says when it is stopped before it began
(one line on stderr, exit 130, and for `render` the summary line it promises). Imports nothing
heavy: ``__main__`` calls it before the CLI's libraries are loaded.

Raising ``KeyboardInterrupt`` is not enough on its own: a library may swallow it. pyarrow's lazy
import of pandas does (a Cython check that cannot raise): the stop vanished and the job ran to
the end, or it left pandas half-imported and the next call failed with an ``AttributeError``.
So the handler also remembers the stop, and the driver and the CLI ask ``stop_asked()``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

EXIT_INTERRUPTED = 130
_ASKED = threading.Event()  # set by the first handler; never cleared in a process's life


def _interrupt(signum, frame) -> None:
    _ASKED.set()
    raise KeyboardInterrupt


def own_stop_signals() -> None:
    """SIGTERM (a scheduler stopping the job) and SIGINT are Ctrl-C from the first instant, and
    remembered. Not on the main thread (embedded use), the caller's handlers stay."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, _interrupt)
        except ValueError:
            return


def stop_asked() -> bool:
    """A stop arrived through ``own_stop_signals``' handler, whatever became of its interrupt."""
    return _ASKED.is_set()


def interrupted_before_start(argv: list[str]) -> int:
    """Stopped before the command began: nothing was read or written."""
    print("klein-ray: interrupted while starting; nothing was done, re-run the same command", file=sys.stderr)
    if argv[:1] == ["render"]:
        print(json.dumps({"total": None, "committed": 0, "skipped": 0, "failed": 0, "remaining": None,
                          "output": None, "seconds": 0.0, "run_id": None, "interrupted": True,
                          "stopped": None}), flush=True)
    return EXIT_INTERRUPTED

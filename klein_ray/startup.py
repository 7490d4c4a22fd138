"""What a command says when it is stopped before it began (a scheduler's SIGTERM while Python is
still importing): one line on stderr, exit 130, and for `render` the summary line it promises.
Imports nothing heavy: ``__main__`` calls it before the CLI's libraries are loaded."""

from __future__ import annotations

import json
import sys

EXIT_INTERRUPTED = 130


def interrupted_before_start(argv: list[str]) -> int:
    """Stopped before the command began: nothing was read or written."""
    print("klein-ray: interrupted while starting; nothing was done, re-run the same command", file=sys.stderr)
    if argv[:1] == ["render"]:
        print(json.dumps({"total": None, "committed": 0, "skipped": 0, "failed": 0, "remaining": None,
                          "output": None, "seconds": 0.0, "run_id": None, "interrupted": True,
                          "stopped": None}), flush=True)
    return EXIT_INTERRUPTED

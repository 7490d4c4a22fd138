"""`python -m klein_ray` and the `klein-ray` script: the CLI, with SIGTERM owned from the first
line, and an exit status that is the command's own.

A scheduler may stop a job while Python is still importing the CLI's libraries (torch, pyarrow,
pydantic take seconds): that stop is an interrupt like any other, exit 130, with the summary line
`render` promises (nothing had started yet), never a bare 143.

Once the command has decided its exit status and printed its result, the process ends without
tearing the interpreter down. Native libraries keep threads of their own (pyarrow's Parquet
readers do), and one still alive while the interpreter and the C++ runtime are destroyed aborts
the process: `verify` printed "0 broken" and exited -6 (SIGABRT, "terminate called without an
active exception"), about once in 40 runs on a loaded machine; and `render --executor local`
whose hung units were still inside torch exited 134. A scheduler reads either as a failed job.
The exit functions (Ray's shutdown, logging's flush, temporary directories' removal) still run,
and the threads a command left running are still waited for (daemons aside), as Python's own
exit would.
"""

import atexit
import os
import sys
import threading
from typing import NoReturn

from klein_ray.startup import interrupted_before_start, own_stop_signals, stop_asked


def entry() -> NoReturn:
    """Run the command and end the process with its exit status."""
    try:
        code = command()
    except SystemExit as stop:  # argparse's --help and usage errors
        if stop.code is not None and not isinstance(stop.code, int):
            raise  # a message to print: Python's own exit prints it
        code = stop.code or 0
    end_process(code)


def command() -> int:
    """The command's exit status; stopped while the CLI was still importing: interrupted."""
    own_stop_signals()
    try:
        from klein_ray.cli import main
    except KeyboardInterrupt:
        return interrupted_before_start(sys.argv[1:])
    except Exception:  # a library swallowed the interrupt and broke on the way (see startup)
        if not stop_asked():
            raise
        return interrupted_before_start(sys.argv[1:])
    return main()


def end_process(code: int) -> NoReturn:
    """What Python's exit does, less the interpreter's teardown (see the module's docstring):
    end thread pools and wait for the threads that are not daemons, run the exit functions,
    flush, exit ``code``. A stop that arrives meanwhile cuts the wait short, not the status."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own first step:
        # it also tells idle thread pools left open to end, which joining them would wait on
    except KeyboardInterrupt:  # a stop once the command has ended: only the wait is left to stop
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): the status still stands
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()

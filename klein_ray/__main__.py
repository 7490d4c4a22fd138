"""`python -m klein_ray` and the `klein-ray` script: the CLI, with SIGTERM owned from the first
line. A scheduler may stop a job while Python is still importing the CLI's libraries (torch,
pyarrow, pydantic take seconds): that stop is an interrupt like any other, exit 130, with the
summary line `render` promises (nothing had started yet), never a bare 143."""

import sys

from klein_ray.startup import interrupted_before_start, own_stop_signals, stop_asked


def entry() -> int:
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


if __name__ == "__main__":
    sys.exit(entry())

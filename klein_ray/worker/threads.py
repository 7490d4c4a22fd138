"""The render worker's threads: the one thread that makes every model (torch) call, and the
bounded pool that encodes images beside it.

Why one model thread. Every thread that runs torch on the CPU gets an OpenMP team of its own
(libgomp keeps a pool of worker threads per calling thread). When the process has more such
threads than cores, libgomp stops spinning between parallel regions ("throttled" waiting): each
of the thousands of small operations of a render then wakes its team through the kernel, and
the render runs at little more than one core's speed. A worker whose unit threads each called
the model (under a lock) built one team per unit thread: on 2 cores its renders took ~1.8x as
long as the same calls on one thread (benchmarks/README.md, Throughput). So the model is loaded
and every render runs on one thread per worker; unit threads hand their calls to it and wait.

The encoder pool is sized to the CPUs the worker may use: it encodes one unit's images while the
model thread renders the next unit (which another unit thread has already handed over), and no
more encodes run at once than there are cores for them, whatever the number of units in flight.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_STOP = None  # what ends a model thread


class ModelThread:
    """A daemon thread running the calls handed to it, one at a time, in the order given.

    Daemon: a call that never returns (a wedged driver) must not hold the process at exit. The
    thread references only its queue, never this object; when the object is collected (its
    worker dropped or replaced) the thread ends, and its OpenMP team with it."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(self._calls,), name=name, daemon=True)
        self.thread.start()
        weakref.finalize(self, self._calls.put, _STOP)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the model thread, after the calls handed over before it;
        returns its result or raises its exception, here, in the caller's thread."""
        if threading.current_thread() is self.thread:  # a call from a call: it would wait forever
            return fn(*args, **kwargs)
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future.result()


def _serve(calls: queue.SimpleQueue) -> None:
    while True:
        item = calls.get()
        if item is _STOP:
            return
        future, fn, args, kwargs = item
        del item
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                future.set_exception(exc)
        # Nothing of the last call (its images, its bound worker) stays alive while waiting.
        del future, fn, args, kwargs


def encoder_pool(cpus: int | None, name: str) -> ThreadPoolExecutor:
    """The worker's encoders: one thread per CPU it may use (at least one). Pillow and hashlib
    release the GIL while they compress and hash, so these threads really run in parallel."""
    return ThreadPoolExecutor(max_workers=max(1, int(cpus or 1)), thread_name_prefix=name)

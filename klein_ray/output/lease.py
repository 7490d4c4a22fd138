"""The output lease: one driver at a time per OUT.

``_job/lease.json`` names the holder (run id, host, pid) and when the lease expires; a
heartbeat thread renews it. A second driver pointed at the same OUT refuses with a clear message
while the lease is live. A lease is stale (and taken over) once expired, or at once when its
holder was on this host and its process is gone (a killed driver re-run on the same machine).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from klein_ray.output.layout import LEASE
from klein_ray.storage import AlreadyExists, NotFound, Store

TTL_S = 60.0
RENEW_EVERY_S = 15.0


class LeaseHeld(Exception):
    """Another live driver holds the output."""


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    expires_at: float  # unix time

    def stale(self, now: float) -> bool:
        if now >= self.expires_at:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


class Lease:
    def __init__(self, store: Store, run_id: str, ttl: float = TTL_S):
        self.store = store
        self.ttl = ttl
        self.record = LeaseRecord(run_id, socket.gethostname(), os.getpid(), 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the holder."""
        for _ in range(3):
            try:
                self._write(if_absent=True)
                break
            except AlreadyExists:
                holder = self._read()
                if holder is not None and not holder.stale(time.time()):
                    raise LeaseHeld(
                        f"another klein-ray job (run {holder.run_id}, host {holder.host}, pid "
                        f"{holder.pid}) is writing to this output; its lease expires in "
                        f"{max(0, holder.expires_at - time.time()):.0f} s. Wait for it, or stop it."
                    ) from None
                self.store.delete(LEASE)  # stale: its holder is gone
        else:
            raise LeaseHeld("could not take the output lease (contended); retry")
        self._thread = threading.Thread(target=self._renew, name="klein-ray-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.run_id == self.record.run_id:
            self.store.delete(LEASE)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self._write(if_absent=False)
            except Exception:  # noqa: BLE001 - a missed renewal is retried at the next beat
                pass

    def _write(self, if_absent: bool) -> None:
        record = LeaseRecord(self.record.run_id, self.record.host, self.record.pid, time.time() + self.ttl)
        self.store.put(LEASE, json.dumps(asdict(record)).encode(), content_type="application/json",
                       if_absent=if_absent)

    def _read(self) -> LeaseRecord | None:
        try:
            return LeaseRecord(**json.loads(self.store.get(LEASE)))
        except (NotFound, ValueError, TypeError):
            return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

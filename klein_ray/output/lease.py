"""The output lease: one driver at a time per OUT, fenced by the lease object's version.

``_job/lease.json`` names its holder. Every write of it is conditional on the version read, so
two drivers can never both believe they hold it:

- **take**: create it if absent; a record of ours after a lost reply is recognised by its nonce.
  A held lease is taken over (replaced, ``If-Match``) only when it is released, or stale. Stale
  is judged on the taker's own clock, never by comparing clocks: the same version seen unchanged
  for the holder's TTL, whoever holds it. A holder that is alive but not renewing (stopped with
  SIGSTOP, hung) is stale like any other: fencing makes taking it over safe. Only a provably
  dead holder is taken at once: same boot, same PID namespace, and its pid gone, reused by
  another process, or a zombie. Every taker's record carries the next **epoch** (one more than
  the record it replaces), which every image and marker its run writes carries too
  (``output.ledger``): a writer never replaces what a newer epoch wrote.
- **renew**: every TTL/4, replacing only the version we wrote last. A renewal that finds another
  holder, or no lease at all, loses it (a lost lease is never recreated: whoever released or
  removed it may have finished our work); so does renewing failing for longer than
  ``TTL - TTL/4`` (others may take over at TTL). ``confirm`` renews at once when the last
  renewal is older than TTL/4: the driver asks before every write under ``_job/``, so a driver
  woken from a long pause learns it lost the lease before it writes anything. Losing calls
  ``on_lost`` once, which stops the driver (no new work, exit 75) within one renewal interval. Renewals go through
  ``renew_store``, a client whose requests give up within about TTL/4 (the driver's; see
  ``StorageConfig.within``): with the job's own retry budget (minutes, for outages) one stuck
  renewal would keep the driver from learning in time that it lost the lease.
- **release**: replace our version with a released record (fenced), which any driver takes at
  once. It is never deleted: it keeps the epoch, so the next holder's is higher still (and on
  S3 a delete landing late could remove a successor's lease: Ceph RGW ignores ``If-Match`` on
  delete).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from klein_ray.output.layout import LEASE
from klein_ray.storage import AlreadyExists, NotFound, StorageError, Store, VersionChanged

log = logging.getLogger(__name__)

TTL_S = 60.0


def _clock() -> float:
    """Seconds on a clock that goes on while the machine sleeps (a suspended laptop or VM must
    not wake believing its lease is fresh); monotonic where there is none."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()
POLL_S = 1.0  # how often a taker looks at a held lease, and a failing renewal retries


class LeaseHeld(Exception):
    """Another live driver holds the output."""


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    nonce: str  # this acquisition: our own create is recognised after a lost reply
    seq: int  # renewals so far: every write differs, so every version differs
    ttl: float  # the holder renews well within this, on its own clock
    host: str
    pid: int
    epoch: int = 0  # one more than the record this one replaced; 0 in records before epochs
    boot_id: str = ""  # these three decide same-host liveness (empty: unknown)
    pid_ns: str = ""
    pid_start: str = ""
    released: bool = False
    written_at: float = 0.0  # the holder's wall clock, for people reading it; never compared

    def describe(self) -> str:
        return f"run {self.run_id}, host {self.host}, pid {self.pid}"


class Lease:
    def __init__(self, store: Store, run_id: str, ttl: float = TTL_S,
                 on_lost: Callable[[str], None] | None = None, renew_store: Store | None = None):
        self.store = store
        self.renewals = renew_store or store  # the same objects, through a quick-to-fail client
        self.ttl = ttl
        self.renew_every = ttl / 4
        self.on_lost = on_lost or (lambda reason: None)
        boot_id, pid_ns, pid_start = _identity(os.getpid())
        self.record = LeaseRecord(run_id, uuid.uuid4().hex, 0, ttl, socket.gethostname(),
                                  os.getpid(), boot_id=boot_id, pid_ns=pid_ns, pid_start=pid_start)
        self.etag: str | None = None
        self.lost: str | None = None
        self._last_renewed = 0.0  # monotonic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the holder (waits up to the holder's TTL
        when its liveness cannot be told at once)."""
        watched: tuple[str, float] | None = None  # (version, when we first saw it: our clock)
        while True:
            try:
                self.record = replace(self.record, epoch=1)
                self._take(self._write(if_absent=True))
                return
            except AlreadyExists:
                pass
            try:
                current = self.store.get_versioned(LEASE)
            except NotFound:
                continue  # released and removed since: create it
            holder = _parse(current.data)
            if self._is_ours(holder):
                self._take(current.etag)  # our create landed; its reply was lost
                return
            watched = self._judge(holder, current.etag, watched)
            if watched is None:  # free to take: replace exactly the version we judged
                try:
                    self.record = replace(self.record, epoch=_next_epoch(holder, current.data))
                    self._take(self._write(if_match=current.etag))
                    return
                except VersionChanged:
                    continue
            time.sleep(POLL_S)

    def _judge(self, holder: LeaseRecord | None, etag: str,
               watched: tuple[str, float] | None) -> tuple[str, float] | None:
        """None if the lease may be taken now; else what we are watching. Raises LeaseHeld if
        the holder is alive."""
        if holder is not None and holder.released:
            return None
        if holder is None:  # unreadable (another version's format?): only time can tell
            holder = LeaseRecord("?", "", 0, self.ttl, "an unreadable lease record", 0)
        liveness = _liveness(holder)
        if liveness == "dead":
            log.info("the output's lease names %s, which is gone (this host): taking it", holder.describe())
            return None
        if watched is not None and watched[0] != etag:
            raise LeaseHeld(f"another klein-ray job ({holder.describe()}) is writing to this output "
                            "and renewing its lease. Wait for it, or stop it.")
        if watched is None:
            alive = " (its process is alive on this host; it is taken over if it does not renew)" \
                if liveness == "alive" else ""
            log.warning("the output's lease names %s%s; waiting up to %.0f s to see it renewed or "
                        "stale", holder.describe(), alive, holder.ttl)
            return etag, _clock()
        if _clock() - watched[1] >= holder.ttl:
            log.warning("the output's lease of %s was not renewed for %.0f s: taking it over (safe "
                        "whoever holds it: what a stale holder writes from now on is fenced by the "
                        "epoch)", holder.describe(), holder.ttl)
            return None
        return watched

    def _take(self, etag: str) -> None:
        self.etag = etag
        self._last_renewed = _clock()
        self._thread = threading.Thread(target=self._renew_loop, name="klein-ray-lease", daemon=True)
        self._thread.start()

    # -- keeping -----------------------------------------------------------------------

    def confirm(self) -> bool:
        """Whether the lease is still ours, renewing it now when the last renewal is older than
        a renewal interval (a pause, a slow renewal thread). False once it is lost: then nothing
        more may be written under ``_job/``."""
        if self.etag is None:
            return False
        if self.lost is None and _clock() - self._last_renewed >= self.renew_every:
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a failing renewal is the renewal thread's to judge
                pass
        return self.renewed_recently()

    def renewed_recently(self) -> bool:
        """Held and renewed recently enough that no one else can have taken it over (False
        right after this process woke from a long pause, until the next renewal says)."""
        return self.lost is None and _clock() - self._last_renewed < self.ttl - self.renew_every

    def _renew_loop(self) -> None:
        wait = self.renew_every
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.renew_every
            except Exception as exc:  # noqa: BLE001 - any failure to renew (a local OSError too)
                if _clock() - self._last_renewed >= self.ttl - self.renew_every:
                    self._lose(f"could not renew it for {self.ttl - self.renew_every:.0f} s ({exc})")
                    return
                wait = POLL_S
            if self.lost:
                return

    def renew(self) -> None:
        """One renewal, fenced on the version we wrote last."""
        with self._lock:
            if self.lost or self._stop.is_set():
                return
            self.record = replace(self.record, seq=self.record.seq + 1)
            sent = _clock()  # the lease is fresh from when the write left, not when it was answered
            try:
                self.etag = self._write(if_match=self.etag, store=self.renewals)
            except VersionChanged:
                if not self._recover():
                    return
            self._last_renewed = sent

    def _recover(self) -> bool:
        """Our version is gone: a lost reply of our own write, a stray delete, or a taker."""
        try:
            current = self.renewals.get_versioned(LEASE)
        except NotFound:  # released by a successor who finished, or removed by hand: never recreate
            self._lose("the lease record is gone (another driver finished here and released it, "
                       "or it was removed)")
            return False
        holder = _parse(current.data)
        if self._is_ours(holder):  # only we write our nonce: an earlier write of ours landed
            self.etag = current.etag
            return True
        who = holder.describe() if holder else "an unreadable record"
        self._lose(f"it was taken over ({who})")
        return False

    def _lose(self, why: str) -> None:
        self.lost = f"lost the output's lease: {why}"
        log.error("%s; stopping (no new work)", self.lost)
        self.on_lost(self.lost)

    # -- letting go --------------------------------------------------------------------

    def release(self) -> None:
        """Give the lease back if it is still ours; never touches another driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.etag is None or self.lost:
                return
            self.record = replace(self.record, seq=self.record.seq + 1, released=True)
            try:
                etag: str | None = self._write(if_match=self.etag)
            except VersionChanged:
                etag = self._released_late()
                if etag is None:
                    return  # not ours any more: someone took it over, leave theirs alone
            except StorageError as exc:
                log.warning("could not release the output's lease (%s); it goes stale in %.0f s",
                            exc, self.ttl)
                return
            # Kept, never deleted: its epoch is where the next holder's starts.

    def _released_late(self) -> str | None:
        """Our version changed under a release: an earlier write of ours landed late (release
        again, fenced on it), or the lease is someone else's now (None)."""
        try:
            current = self.store.get_versioned(LEASE)
        except NotFound:
            return None
        holder = _parse(current.data)
        if holder is not None and holder.nonce == self.record.nonce and holder.released:
            return current.etag
        if not self._is_ours(holder):
            return None
        try:
            return self._write(if_match=current.etag)
        except VersionChanged:
            return None

    def _is_ours(self, holder: LeaseRecord | None) -> bool:
        return holder is not None and holder.nonce == self.record.nonce and not holder.released

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write(self, if_absent: bool = False, if_match: str | None = None, store: Store | None = None) -> str:
        record = replace(self.record, written_at=time.time())
        return (store or self.store).put(LEASE, json.dumps(asdict(record)).encode(),
                                         content_type="application/json", if_absent=if_absent, if_match=if_match)


def _parse(data: bytes) -> LeaseRecord | None:
    try:
        return LeaseRecord(**json.loads(data))
    except (ValueError, TypeError):
        return None


def holder_gone(store: Store, run_id: str) -> str | None:
    """Why the run ``run_id`` no longer holds the output's lease, or None if it may (for
    ``status``: a run whose progress says "running" is interrupted when its lease is released,
    held by another run, or its holder is provably dead on this host; or, judged by the
    holder's own wall clock, not renewed for two TTLs)."""
    try:
        record = _parse(store.get(LEASE))
    except NotFound:
        return "no lease is held"
    if record is None:
        return None
    if record.run_id != run_id:
        return f"the lease is run {record.run_id}'s now"
    if record.released:
        return "its lease was released"
    if _liveness(record) == "dead":
        return f"its driver (pid {record.pid}) is gone"
    age = time.time() - record.written_at
    if record.written_at and age > 2 * record.ttl:
        return f"its lease was last renewed {age:.0f} s ago (TTL {record.ttl:.0f} s)"
    return None


def newer_epoch(store: Store, epoch: int) -> int:
    """The lease's epoch if it is newer than ``epoch`` (another run holds or held the output
    since), else 0. For workers, before they commit for the run that started them."""
    try:
        current = _parse(store.get(LEASE))
    except NotFound:
        return 0
    return current.epoch if current is not None and current.epoch > epoch else 0


def _next_epoch(holder: LeaseRecord | None, data: bytes) -> int:
    """The epoch after the record we replace (an unreadable one: after any epoch it mentions)."""
    if holder is not None:
        return holder.epoch + 1
    try:
        epoch = json.loads(data).get("epoch", 0)
    except (ValueError, AttributeError):
        epoch = 0
    return (epoch if isinstance(epoch, int) else 0) + 1


def _liveness(holder: LeaseRecord) -> str:
    """"alive", "dead" or "unknown": only a holder in this kernel's boot and this PID namespace
    can be judged by its pid (a hostname is not enough: containers share it with host networking).
    "alive" says only that the process exists (it may be stopped or hung): it is never a reason
    to refuse; "dead" (gone, the pid reused, a zombie) is a reason to take over at once."""
    boot_id, pid_ns, _ = _identity(os.getpid())
    if not (holder.boot_id and holder.pid_ns and holder.pid_start) or \
            (holder.boot_id, holder.pid_ns) != (boot_id, pid_ns):
        return "unknown"
    start = _identity(holder.pid)[2]
    if start:
        if start != holder.pid_start or _state(holder.pid) == "Z":  # another process, or a zombie
            return "dead"
        return "alive"
    try:  # /proc would not say (hidepid): ask the kernel whether the pid exists at all
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError:
        return "unknown"
    return "unknown"


def _state(pid: int) -> str:
    """The process state letter /proc gives (R, S, T, Z, ...), '' when it cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else ""


def _identity(pid: int) -> tuple[str, str, str]:
    """(boot id, PID namespace, the process's start time in clock ticks since boot): empty
    strings where /proc cannot tell (not Linux, or no such process)."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    stat = read(f"/proc/{pid}/stat")
    # Field 22 is the start time; the command name (field 2) may hold spaces: split after it.
    start = stat.rsplit(")", 1)[-1].split()[19] if stat else ""
    return read("/proc/sys/kernel/random/boot_id"), pid_ns, start

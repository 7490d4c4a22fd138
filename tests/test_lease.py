"""The fenced output lease, each reproduced failure of the old one forced with real stores
(LocalStore and moto): renewals and takeovers replace only the version read, staleness is seen
on the taker's clock, release touches only our own lease, our own create is recognised after a
lost reply, and same-host takeover happens at once only when the holder is provably gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import pytest
from helpers import passthrough_store

from klein_ray.output import lease as lease_mod
from klein_ray.output.layout import LEASE
from klein_ray.output.lease import Lease, LeaseHeld, LeaseRecord, _identity
from klein_ray.storage import AlreadyExists, LocalStore, StorageError, Store, open_store


@pytest.fixture(params=["local", pytest.param("moto", marks=pytest.mark.slow)])  # (moto: TTL waits, slow tier)
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    server = request.getfixturevalue("s3_env")(request.getfixturevalue("moto_s3"))
    return open_store(f"s3://{server.new_bucket()}/out")


class Hooked(passthrough_store()):
    """A real store with a hook run in place of every write (to force an interleaving)."""

    def __init__(self, inner: Store, hook):
        super().__init__(inner)
        self.hook = hook

    def put(self, key, data, **kw):
        return self.hook(self.inner, key, data, kw)


def _paused(store: Store, run_id: str, ttl: float, lost: list) -> Lease:
    """A holder whose renewals we run by hand: between two of them it is 'paused'."""
    lease = Lease(store, run_id, ttl=ttl, on_lost=lost.append)
    lease.renew_every = 3600.0  # the background thread never fires in these tests
    return lease


def _holder(store: Store, **fields) -> None:
    record = dict(run_id="other", nonce=uuid.uuid4().hex, seq=0, ttl=1.0, host="elsewhere", pid=1)
    record.update(fields)
    store.put(LEASE, json.dumps(record).encode())


def _free(store: Store) -> bool:
    """No lease is held: a released record, never deleted (it keeps the epoch the next holder
    counts from; on S3 a late delete could also remove a successor's lease)."""
    return _current(store).released


def _current(store: Store) -> LeaseRecord:
    return LeaseRecord(**json.loads(store.get(LEASE)))


def test_a_driver_paused_past_its_ttl_learns_it_lost_the_lease(store):
    lost: list[str] = []
    first = _paused(store, "first", ttl=1.0, lost=lost)
    first.acquire()
    first.record = replace(first.record, host="elsewhere", pid_ns="other-container")
    first.renew()  # now it looks like a holder in another container: only its TTL can tell
    second = Lease(store, "second", ttl=1.0)
    started = time.monotonic()
    second.acquire()  # watches first's version unchanged for the TTL on its own clock
    assert time.monotonic() - started >= 1.0
    first.renew()  # woken: the old code overwrote second's lease here and never knew
    assert first.lost and lost and "taken over" in lost[0] and "second" in lost[0]
    assert not first.renewed_recently()
    first.release()  # must not touch second's lease
    assert _current(store).run_id == "second" and not _current(store).released
    second.renew()
    assert second.lost is None
    second.release()
    assert _free(store)


def test_two_takers_of_one_stale_lease_cannot_both_win(store):
    """The old takeover was delete-then-create: two takers could both delete and both create."""
    _holder(store, released=True)
    barrier = threading.Barrier(2, timeout=10)
    takeovers = iter(range(2))

    def both_at_once(inner, key, data, kw):
        if kw.get("if_match") and next(takeovers, None) is not None:
            barrier.wait()  # both judged the same version free; now both replace it
        return inner.put(key, data, **kw)

    results: dict[str, str] = {}
    leases: list[Lease] = []

    def take(name: str) -> None:
        lease = Lease(Hooked(store, both_at_once), name, ttl=4.0)  # the winner renews every 1 s
        leases.append(lease)
        try:
            lease.acquire()
            results[name] = "holds"
        except LeaseHeld as exc:
            results[name] = str(exc)

    threads = [threading.Thread(target=take, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for lease in leases:
        lease._stop.set()
    assert sorted(results.values()).count("holds") == 1, results
    loser = next(v for v in results.values() if v != "holds")
    assert "another klein-ray job" in loser  # it re-read the lease and saw it renewed
    assert _current(store).run_id in results and results[_current(store).run_id] == "holds"


def test_a_renewing_holder_is_never_taken_over_whatever_its_clock_says(store):
    """Staleness compared the holder's wall clock with ours; now only versions count."""
    _holder(store, written_at=0.0, ttl=2.0)  # a clock decades behind, another host
    stop = threading.Event()

    def keep_renewing():
        seq = 1
        while not stop.wait(0.3):
            _holder(store, written_at=0.0, ttl=2.0, seq=seq)
            seq += 1

    renewer = threading.Thread(target=keep_renewing)
    renewer.start()
    try:
        with pytest.raises(LeaseHeld, match="renewing its lease"):
            Lease(store, "taker", ttl=2.0).acquire()
    finally:
        stop.set()
        renewer.join()


def test_a_silent_holder_with_a_clock_ahead_is_taken_over_after_its_ttl(store):
    _holder(store, written_at=time.time() + 10 * 365 * 86400, ttl=1.0)
    lease = Lease(store, "taker", ttl=5.0)
    lease.acquire()
    assert _current(store).run_id == "taker"
    lease.release()


def test_our_own_create_is_recognised_after_a_lost_reply(store):
    """The create landed but its reply was lost; the retry sees 412. The old lease refused its
    own record (exit 2)."""
    def lose_reply(inner, key, data, kw):
        etag = inner.put(key, data, **kw)
        if kw.get("if_absent"):
            raise AlreadyExists(key)
        return etag

    lease = Lease(Hooked(store, lose_reply), "me", ttl=30.0)
    lease.acquire()
    assert _current(store).run_id == "me"
    lease.release()
    assert _free(store)


@pytest.mark.subprocess
def test_same_host_dead_holder_is_taken_over_at_once(store):
    boot_id, pid_ns, _ = _identity(os.getpid())
    if not (boot_id and pid_ns):
        pytest.skip("no /proc here")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _holder(store, host="this", pid=gone.pid, boot_id=boot_id, pid_ns=pid_ns, pid_start="1", ttl=3600.0)
    lease = Lease(store, "me", ttl=30.0)
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started < 5  # no TTL wait: provably gone
    lease.release()


def test_a_same_host_holder_alive_but_not_renewing_is_taken_over_after_its_ttl(store):
    """A driver stopped with SIGSTOP, or hung, keeps its pid: alive, yet it renews nothing. Its
    lease goes stale like any other (before, a live pid on this host refused at once, exit 2,
    for as long as the process stayed stopped)."""
    boot_id, pid_ns, start = _identity(os.getpid())
    if not (boot_id and pid_ns):
        pytest.skip("no /proc here")
    _holder(store, pid=os.getpid(), boot_id=boot_id, pid_ns=pid_ns, pid_start=start, ttl=1.0, epoch=1)
    lease = Lease(store, "me", ttl=30.0)
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started >= 1.0  # watched for its TTL, not refused
    assert lease.record.epoch == 2  # one more than the record it took over
    lease.release()


@pytest.mark.subprocess
def test_a_zombie_holder_is_dead_and_taken_over_at_once(store):
    """A driver that died but was not reaped keeps its pid and start time in /proc: it is dead
    all the same (before: judged alive by its start time, so the output was blocked, exit 2)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while lease_mod._state(child.pid) != "Z":  # exited, not yet reaped: a zombie
            assert time.monotonic() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        boot_id, pid_ns, start = _identity(child.pid)
        if not (boot_id and pid_ns and start):
            pytest.skip("no /proc here")
        _holder(store, pid=child.pid, boot_id=boot_id, pid_ns=pid_ns, pid_start=start, ttl=3600.0)
        lease = Lease(store, "me", ttl=30.0)
        started = time.monotonic()
        lease.acquire()
        assert time.monotonic() - started < 5
        lease.release()
    finally:
        child.wait()


def test_a_holder_in_another_pid_namespace_is_not_judged_by_pid(store):
    """Containers with host networking share the hostname: pid 1 'alive' here says nothing."""
    boot_id, _, _ = _identity(os.getpid())
    _holder(store, pid=os.getpid(), boot_id=boot_id, pid_ns="pid:[1]", pid_start="0", ttl=1.0)
    lease = Lease(store, "me", ttl=30.0)
    started = time.monotonic()
    lease.acquire()  # waited the holder's TTL unchanged, then took over
    assert time.monotonic() - started >= 1.0
    lease.release()


def test_a_driver_that_cannot_renew_loses_the_lease_before_anyone_could_take_it(store):
    broken = threading.Event()

    def outage(inner, key, data, kw):
        if broken.is_set():
            raise StorageError("put: connection refused")
        return inner.put(key, data, **kw)

    lost = threading.Event()
    lease = Lease(Hooked(store, outage), "me", ttl=1.0, on_lost=lambda why: lost.set())
    lease.acquire()
    broken.set()
    assert lost.wait(5), "never noticed"
    assert "could not renew" in lease.lost
    assert not lease.renewed_recently()
    lease.release()  # cannot reach the store: leaves it to go stale, no exception


def test_a_released_lease_is_taken_at_once_and_never_deleted_on_s3(store):
    first = Lease(store, "first", ttl=3600.0)
    first.acquire()
    first.release()
    assert _free(store)
    second = Lease(store, "second", ttl=3600.0)
    started = time.monotonic()
    second.acquire()
    assert time.monotonic() - started < 5 and _current(store).run_id == "second"
    second.release()


def test_an_unreadable_lease_record_is_watched_not_taken(store):
    """A record this version cannot read (another version's format) may be a live driver's."""
    store.put(LEASE, json.dumps({"run_id": "old", "host": "h", "pid": 1, "expires_at": 0}).encode())
    lease = Lease(store, "me", ttl=30.0)
    lease.ttl = 1.0  # the watch uses our TTL for a record that names none
    started = time.monotonic()
    lease.acquire()
    assert time.monotonic() - started >= 1.0
    lease.release()


def test_a_renewal_that_raises_anything_loses_the_lease_in_time(tmp_path):
    """A local OSError (disk full, a stale NFS handle) killed the renewal thread silently: the
    driver then neither renewed nor stopped."""
    store = LocalStore(tmp_path / "out")

    class DiskFull(passthrough_store()):
        def put(self, key, data, **kw):
            raise OSError(28, "No space left on device")

    lost = threading.Event()
    lease = Lease(store, "me", ttl=1.0, on_lost=lambda why: lost.set(), renew_store=DiskFull(store))
    lease.acquire()
    assert lost.wait(5) and "could not renew" in lease.lost


@pytest.mark.slow  # waits out client timeouts
def test_a_renewal_stuck_in_the_network_does_not_stall_the_lease(moto_s3, s3_env):
    """The job's storage client rides out outages (long timeouts, minutes of retries); a renewal
    sent through it that the network swallows kept the lease thread waiting for all of that, so
    a driver that had in fact lost its lease learnt it minutes late. Renewals now go through a
    client that gives up within about TTL/4: the stuck request is abandoned and the next one
    renews, while the stuck one is still held."""
    from faultproxy import FaultProxy

    from klein_ray.config import StorageConfig

    s3_env(moto_s3)
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint, rate=0) as proxy:
        patient = StorageConfig(endpoint_url=proxy.url, read_timeout=60.0, max_attempts=5)
        uri = f"s3://{bucket}/out"
        ttl = 4.0
        lease = Lease(open_store(uri, patient), "me", ttl=ttl,
                      renew_store=open_store(uri, patient.within(ttl / 4)))
        lease.acquire()
        held = proxy.hold("PUT", "/out/_job/lease.json")
        assert held.arrived.wait(10)
        seq = lease.record.seq
        deadline = time.monotonic() + 10
        while lease.record.seq < seq + 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the outcome, not timing a race
        assert lease.record.seq >= seq + 2, "the lease thread is still waiting on the stuck request"
        assert not held.landed.is_set() and lease.lost is None and lease.renewed_recently()
        held.release()
        assert held.landed.wait(10) and held.status == 412  # it lands late and changes nothing
        assert _current(open_store(uri)).nonce == lease.record.nonce
        lease.release()


def test_within_gives_a_quick_to_fail_copy():
    from klein_ray.config import StorageConfig

    quick = StorageConfig(read_timeout=60, connect_timeout=5, max_attempts=5).within(15)
    assert quick.max_attempts == 2 and quick.outer_retry_seconds == 0
    assert quick.read_timeout == 3.75 and quick.connect_timeout == 3.75
    assert StorageConfig(read_timeout=1, connect_timeout=1).within(60).read_timeout == 1

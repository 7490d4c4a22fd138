"""Writes that land late, through a real S3 server (moto) behind the fault proxy, which holds a
request and lets it land after the race it belongs to is over: a zombie worker of a killed run,
a PUT stuck in the network. Whatever lands late, a committed row's marker and image agree."""

from __future__ import annotations

import hashlib
import threading

import pytest
from faultproxy import FaultProxy

from klein_ray.config import StorageConfig
from klein_ray.output.ledger import CommittedRow, Ledger
from klein_ray.storage import open_store

FIRST = b"\x89PNG\r\n\x1a\n" + b"zombie's image" * 50
SECOND = b"\x89PNG\r\n\x1a\n" + b"the living run's image" * 50


@pytest.fixture
def servers(moto_s3, s3_env):
    s3_env(moto_s3)
    bucket = moto_s3.new_bucket()
    with FaultProxy(moto_s3.endpoint, rate=0) as proxy:
        yield f"s3://{bucket}/out", proxy


def _zombie(uri: str, proxy: FaultProxy) -> Ledger:
    """A writer that talks through the proxy and gives up fast (then it is 'killed')."""
    cfg = StorageConfig(endpoint_url=proxy.url, read_timeout=1.0, max_attempts=1, outer_retry_seconds=0)
    return Ledger(open_store(uri, cfg))


def _in_background(fn) -> threading.Thread:
    def run():
        try:
            fn()
        except Exception:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_late_image_write_from_a_killed_run_leaves_the_committed_row_intact(servers):
    uri, proxy = servers
    held = proxy.hold("PUT", "/out/images/row-1.png")
    zombie = _in_background(lambda: _zombie(uri, proxy).commit(
        "row-1", "png", FIRST, "image/png", {"writer": "zombie"}, fingerprint="run-1"))
    assert held.arrived.wait(10)
    zombie.join(10)  # its client timed out: the 'killed' run never learns what became of it

    living = Ledger(open_store(uri))
    receipt = living.commit("row-1", "png", SECOND, "image/png", {"writer": "living"}, fingerprint="run-2")
    assert receipt.sha256 == hashlib.sha256(SECOND).hexdigest()

    held.release()
    assert held.landed.wait(10)
    assert held.status == 412  # create-only: the old unconditional PUT replaced the image here
    assert isinstance(living.judge("row-1", deep=True), CommittedRow)
    assert open_store(uri).get("images/row-1.png") == SECOND


def test_a_late_replace_of_a_leftover_changes_nothing_once_the_row_is_committed(servers):
    """A leftover of other inputs is replaced only if still the version read: a replace that
    lands after another writer replaced it and committed fails."""
    uri, proxy = servers
    store = open_store(uri)
    leftover = b"left by a run with another prompt"
    store.put("images/row-1.png", leftover, if_absent=True,
              metadata={"sha256": hashlib.sha256(leftover).hexdigest(), "fingerprint": "old"})
    # The zombie's create is refused at once (the key is taken); its replace is held.
    held = proxy.hold("PUT", "/out/images/row-1.png", header="If-Match")
    zombie = _in_background(lambda: _zombie(uri, proxy).commit(
        "row-1", "png", FIRST, "image/png", {"w": "z"}, fingerprint="new-z"))
    assert held.arrived.wait(10)
    zombie.join(10)

    living = Ledger(store)
    living.commit("row-1", "png", SECOND, "image/png", {"w": "living"}, fingerprint="new")
    held.release()
    assert held.landed.wait(10)
    assert held.status == 412
    assert isinstance(living.judge("row-1", deep=True), CommittedRow) and store.get("images/row-1.png") == SECOND

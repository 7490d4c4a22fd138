"""Two writers with DIFFERENT render inputs race on one row: a zombie of an earlier run (epoch 1,
the manifest's old prompt) and the current run (epoch 2). Each interleaving is forced through a
store that lets the other writer act between two of ours; whatever the order, the row ends as
the current run commits it, and the zombie's late writes are refused (``Superseded``) or
repaired over. LocalStore and moto; Ceph RGW in the ceph tier. (Before epochs, the zombie could
replace the current run's uncommitted image, leaving a marker naming bytes that are not stored,
or a row holding the old prompt's render.)"""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import passthrough_store

from klein_ray.output.ledger import CommittedRow, Ledger, Superseded
from klein_ray.storage import LocalStore, open_store

OLD = b"\x89PNG\r\n\x1a\n" + b"the old prompt's render" * 20
NEW = b"\x89PNG\r\n\x1a\n" + b"the new prompt's render" * 20


@pytest.fixture(params=["local", "moto", pytest.param("rgw", marks=pytest.mark.ceph)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    server = request.getfixturevalue("s3_env")(request.getfixturevalue("moto_s3" if request.param == "moto" else "rgw"))
    bucket = server.new_bucket()
    return open_store(f"s3://{bucket}/out")


def _hooked(store, before_put):
    """``store``, calling ``before_put(key, kw)`` ahead of each put (once per hook)."""
    class Hooked(passthrough_store()):
        def put(self, key, data, **kw):
            before_put(key, kw)
            return self.inner.put(key, data, **kw)
    return Hooked(store)


def _commit(ledger: Ledger, image: bytes, prompt: str):
    return ledger.commit("row-1", "png", image, "image/png", {"prompt": prompt}, fingerprint=prompt)


def _ends_current(store) -> None:
    verdict = Ledger(store).judge("row-1", deep=True)
    assert isinstance(verdict, CommittedRow), verdict
    meta = json.loads(store.get("meta/row-1.json"))
    assert meta["prompt"] == "new" and meta["epoch"] == 2
    assert verdict.sha256 == hashlib.sha256(NEW).hexdigest() == hashlib.sha256(store.get("images/row-1.png")).hexdigest()


def test_a_zombie_that_finds_the_current_image_is_refused(store):
    _commit(Ledger(store, epoch=2), NEW, "new")
    with pytest.raises(Superseded):
        _commit(Ledger(store, epoch=1), OLD, "old")
    _ends_current(store)


def test_a_zombie_image_first_then_the_current_run_replaces_it_and_repairs_its_late_marker(store):
    """zombie: image | current: replace image | zombie: marker lands | current: marker repaired."""
    current_done = {}

    def current_acts_before_the_zombie_marker(key, kw):
        if key.startswith("meta/") and "stage" not in current_done:
            current_done["stage"] = "image"  # the current run replaces the zombie's image now
            ours = Ledger(_hooked(store, lambda k, kw: None), epoch=2)
            ours.store.put("images/row-1.png", NEW, metadata={"sha256": hashlib.sha256(NEW).hexdigest(),
                                                              "fingerprint": "new", "epoch": "2"},
                           if_match=store.head("images/row-1.png").etag)

    _commit(Ledger(_hooked(store, current_acts_before_the_zombie_marker), epoch=1), OLD, "old")
    receipt = _commit(Ledger(store, epoch=2), NEW, "new")  # finds the zombie's marker: repairs it
    assert not receipt.already
    _ends_current(store)


def test_a_zombie_marker_after_the_current_commit_is_refused(store):
    def current_commits_first(key, kw):
        if key.startswith("meta/") and not current_commits_first.done:
            current_commits_first.done = True
            _commit(Ledger(store, epoch=2), NEW, "new")
    current_commits_first.done = False
    with pytest.raises(Superseded):
        _commit(Ledger(_hooked(store, current_commits_first), epoch=1), OLD, "old")
    _ends_current(store)


def test_a_zombie_replacing_a_leftover_loses_to_the_current_run(store):
    """Both read the same leftover (an epoch-0 image of other inputs); the current run replaces
    it first; the zombie's replace at the version it read fails, and then it finds epoch 2."""
    store.put("images/row-1.png", b"leftover" * 10, metadata={"sha256": "0" * 64, "fingerprint": "x"})

    def current_replaces_first(key, kw):
        if kw.get("if_match") and not current_replaces_first.done:
            current_replaces_first.done = True
            _commit(Ledger(store, epoch=2), NEW, "new")
    current_replaces_first.done = False
    with pytest.raises(Superseded):
        _commit(Ledger(_hooked(store, current_replaces_first), epoch=1), OLD, "old")
    _ends_current(store)


def test_a_repair_placeholder_of_a_newer_run_is_never_replaced(store):
    _commit(Ledger(store, epoch=1), OLD, "old")
    version = store.get_versioned("meta/row-1.json").etag
    current = Ledger(store, epoch=2)
    assert current._claim("meta/row-1.json", version)  # the current run claims the row for repair
    with pytest.raises(Superseded):
        _commit(Ledger(store, epoch=1), OLD, "old")  # a zombie of the old run, late
    _commit(current, NEW, "new")
    _ends_current(store)

"""The ledger's commit protocol on LocalStore and moto S3: image first, marker last, idempotent
retries, conflicts, and verify() as SPEC's definition of done."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from klein_ray.output.ledger import CommitConflict, Ledger, Receipt
from klein_ray.storage import LocalStore, NotFound, Store, open_store

PNG = b"\x89PNG\r\n\x1a\n" + b"first image" * 20
OTHER = b"\x89PNG\r\n\x1a\n" + b"other image" * 20
META = {"id": "row-1", "prompt": "a red cube", "seed": 7, "passthrough": {"sku": "S-1"}}


@pytest.fixture(scope="module")
def moto_client(moto_s3):
    return moto_s3.client()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    request.getfixturevalue("s3_env")(request.getfixturevalue("moto_s3"))
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    request.getfixturevalue("moto_client").create_bucket(Bucket=bucket)
    return open_store(f"s3://{bucket}/jobs/out")


@pytest.fixture
def ledger(store) -> Ledger:
    return Ledger(store)


def test_commit_writes_image_then_meta(ledger, store):
    receipt = ledger.commit("row-1", "png", PNG, "image/png", META)
    sha = hashlib.sha256(PNG).hexdigest()
    assert receipt == Receipt("images/row-1.png", "meta/row-1.json", sha, len(PNG))
    assert store.get("images/row-1.png") == PNG
    assert store.head("images/row-1.png").metadata == {"sha256": sha}
    meta = json.loads(store.get("meta/row-1.json"))
    assert meta["image"] == {"key": "images/row-1.png", "sha256": sha, "bytes": len(PNG),
                             "content_type": "image/png"}
    for k, v in META.items():
        assert meta[k] == v
    assert ledger.read_meta("row-1") == meta
    assert ledger.committed_ids() == {"row-1"}
    assert ledger.verify("row-1")


@pytest.mark.parametrize("fmt, ext", [("jpeg", "jpg"), ("webp", "webp")])
def test_commit_uses_the_format_extension(ledger, store, fmt, ext):
    receipt = ledger.commit("row-2", fmt, PNG, f"image/{fmt}", {})
    assert receipt.image_key == f"images/row-2.{ext}"
    assert store.get(receipt.image_key) == PNG
    assert ledger.verify("row-2")


def test_commit_does_not_mutate_meta(ledger):
    meta = {"id": "row-1", "nested": {"a": 1}}
    ledger.commit("row-1", "png", PNG, "image/png", meta)
    assert meta == {"id": "row-1", "nested": {"a": 1}}


def test_committed_ids_lists_many_and_ignores_other_keys(ledger, store):
    for i in range(5):
        ledger.commit(f"row-{i}", "png", PNG + bytes([i]), "image/png", {})
    store.put("meta/sub/nested.json", b"{}")  # not a row marker
    store.put("meta/notes.txt", b"x")
    store.put("images/orphan.png", b"x")  # image without marker
    store.put("_job/summary.json", b"{}")
    assert ledger.committed_ids() == {f"row-{i}" for i in range(5)}
    assert all(ledger.verify(f"row-{i}") for i in range(5))


def test_committed_ids_empty_store(ledger):
    assert ledger.committed_ids() == set()
    assert ledger.read_meta("row-1") is None
    assert not ledger.verify("row-1")


def test_second_commit_of_same_bytes_succeeds(ledger, store):
    """A retried commit whose earlier attempt landed: same image, a fresh meta body."""
    first = ledger.commit("row-1", "png", PNG, "image/png", {**META, "attempt": 1})
    second = ledger.commit("row-1", "png", PNG, "image/png", {**META, "attempt": 2})
    assert first == second
    # The marker is the first one: a conditional create never overwrites it.
    assert ledger.read_meta("row-1")["attempt"] == 1
    assert ledger.verify("row-1")
    assert ledger.committed_ids() == {"row-1"}


def test_recommit_with_different_bytes_keeps_the_row_consistent(ledger, store):
    """A later attempt overwrote the committed image: the marker is made to name what is stored
    (never a marker naming one image beside another)."""
    ledger.commit("row-1", "png", PNG, "image/png", META)
    receipt = ledger.commit("row-1", "png", OTHER, "image/png", META)
    assert receipt.sha256 == hashlib.sha256(OTHER).hexdigest() and not receipt.already
    assert store.get("images/row-1.png") == OTHER
    assert ledger.read_meta("row-1")["image"]["sha256"] == receipt.sha256
    assert ledger.verify("row-1")
    assert [o.key for o in store.list("images/")] == ["images/row-1.png"]


class Interleaved(Store):
    """A real store with another writer acting between our image write and our marker write."""

    def __init__(self, inner: Store, on_marker):
        self.inner, self.uri, self.on_marker = inner, inner.uri, on_marker

    def put(self, key, data, **kw):
        if key.startswith("meta/") and kw.get("if_absent") and self.on_marker:
            hook, self.on_marker = self.on_marker, None
            hook(self.inner)
        return self.inner.put(key, data, **kw)

    def get(self, key, max_bytes=None):
        return self.inner.get(key, max_bytes)

    def head(self, key):
        return self.inner.head(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        return self.inner.delete(key)

    def download(self, key, dest):
        return self.inner.download(key, dest)


def _other_writer(data: bytes, marker: bool):
    def act(inner: Store) -> None:
        other = Ledger(inner)
        if marker:
            other.commit("row-1", "png", data, "image/png", {"writer": "other"})
        else:  # the other writer's image only: its marker is still to come
            sha = hashlib.sha256(data).hexdigest()
            inner.put("images/row-1.png", data, content_type="image/png", metadata={"sha256": sha})
    return act


def test_concurrent_consistent_commit_is_kept(store):
    """Another attempt committed between our image and our marker: theirs stands, ours is 'already'."""
    ledger = Ledger(Interleaved(store, _other_writer(OTHER, marker=True)))
    receipt = ledger.commit("row-1", "png", PNG, "image/png", META)
    other_sha = hashlib.sha256(OTHER).hexdigest()
    assert receipt.already
    assert receipt.sha256 == other_sha and receipt.bytes == len(OTHER)
    assert receipt.image_key == "images/row-1.png"
    assert ledger.read_meta("row-1")["writer"] == "other"
    assert store.get("images/row-1.png") == OTHER
    assert Ledger(store).verify("row-1")


def test_commit_conflicts_with_a_write_in_progress(store):
    """Marker names one image, the stored image is a third writer's: neither ours nor named."""
    Ledger(store).commit("row-1", "png", PNG, "image/png", META)
    third = b"third writer's image"
    ledger = Ledger(Interleaved(store, _other_writer(third, marker=False)))
    with pytest.raises(CommitConflict) as info:
        ledger.commit("row-1", "png", OTHER, "image/png", META)
    assert "meta/row-1.json" in str(info.value)
    # Nothing of ours was made final: the marker still names the first image.
    assert ledger.read_meta("row-1")["image"]["sha256"] == hashlib.sha256(PNG).hexdigest()


def test_verify_false_when_image_replaced_behind_the_ledger(ledger, store):
    ledger.commit("row-1", "png", PNG, "image/png", META)
    store.put("images/row-1.png", OTHER)
    assert "row-1" in ledger.committed_ids()  # the cheap check still sees the marker
    assert not ledger.verify("row-1")


def test_verify_false_when_image_deleted(ledger, store):
    ledger.commit("row-1", "png", PNG, "image/png", META)
    store.delete("images/row-1.png")
    assert not ledger.verify("row-1")


def test_verify_false_when_image_truncated(ledger, store):
    ledger.commit("row-1", "png", PNG, "image/png", META)
    store.put("images/row-1.png", PNG[:-1])
    assert not ledger.verify("row-1")


def test_verify_false_when_meta_lacks_image(ledger, store):
    store.put("meta/row-1.json", json.dumps({"id": "row-1"}).encode())
    assert not ledger.verify("row-1")
    store.put("meta/row-2.json", json.dumps({"image": "not-a-dict"}).encode())
    assert not ledger.verify("row-2")


def test_image_without_meta_is_not_committed_and_is_replaced(ledger, store):
    """A crash between the image and the marker leaves an image: not done, and overwritten."""
    store.put("images/row-1.png", b"half-finished leftover")
    assert ledger.committed_ids() == set()
    assert not ledger.verify("row-1")
    receipt = ledger.commit("row-1", "png", PNG, "image/png", META)
    assert store.get("images/row-1.png") == PNG
    assert receipt.sha256 == hashlib.sha256(PNG).hexdigest()
    assert ledger.committed_ids() == {"row-1"}
    assert ledger.verify("row-1")


def test_delete_meta_uncommits(ledger, store):
    ledger.commit("row-1", "png", PNG, "image/png", META)
    store.delete("meta/row-1.json")
    assert ledger.committed_ids() == set()
    assert not ledger.verify("row-1")
    with pytest.raises(NotFound):
        store.get("meta/row-1.json")
    # A later commit of a different image is then allowed.
    ledger.commit("row-1", "png", OTHER, "image/png", META)
    assert ledger.verify("row-1")
    assert store.get("images/row-1.png") == OTHER


# -- once bugs, now pinned -----------------------------------------------------------------


def test_recommit_in_another_format_leaves_one_image(ledger, store):
    ledger.commit("row-1", "png", PNG, "image/png", META)
    try:
        ledger.commit("row-1", "jpeg", OTHER, "image/jpeg", META)
    except CommitConflict:
        pass  # refusing is fine; leaving two images is not
    assert ledger.verify("row-1")
    assert len(list(store.list("images/"))) == 1

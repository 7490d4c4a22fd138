"""Versions and conditional writes, the same on every store: LocalStore, moto, and Ceph RGW (a
real S3 server, which wants bare ETags and ignores If-Match on deletes).

What the commit protocol and the lease build on: a write whose condition fails changes nothing,
however late it arrives, and an object's user metadata always describes its own content.
"""

from __future__ import annotations

import pytest

from klein_ray.storage import AlreadyExists, LocalStore, VersionChanged, open_store


@pytest.fixture(params=["local", "moto", pytest.param("rgw", marks=pytest.mark.ceph)])
def store(request, tmp_path, s3_env):
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    server = s3_env(request.getfixturevalue("moto_s3" if request.param == "moto" else "rgw"))
    return open_store(f"s3://{server.new_bucket()}/out")


def test_put_returns_the_version_that_get_and_head_report(store):
    etag = store.put("a.json", b"one", content_type="application/json")
    assert etag and '"' not in etag
    assert store.get_versioned("a.json").etag == etag
    assert store.head("a.json").etag == etag
    assert store.get_versioned("a.json").data == b"one"


def test_if_match_replaces_only_the_version_read(store):
    first = store.put("lease.json", b"v1")
    second = store.put("lease.json", b"v2", if_match=first)
    assert second != first and store.get("lease.json") == b"v2"
    # A write conditioned on the old version (a late one, or a rival's) changes nothing.
    with pytest.raises(VersionChanged):
        store.put("lease.json", b"late", if_match=first)
    assert store.get("lease.json") == b"v2"


def test_if_match_on_a_missing_key_fails(store):
    etag = store.put("gone.json", b"x")
    store.delete("gone.json")
    with pytest.raises(VersionChanged):
        store.put("gone.json", b"y", if_match=etag)
    assert store.head("gone.json") is None


def test_if_absent_refuses_a_taken_key_and_keeps_its_metadata(store):
    store.put("images/a.png", b"first", metadata={"sha256": "first", "fp": "f1"}, if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put("images/a.png", b"second", metadata={"sha256": "second", "fp": "f2"}, if_absent=True)
    info = store.head("images/a.png")
    assert store.get("images/a.png") == b"first"
    assert info.metadata == {"sha256": "first", "fp": "f1"}  # the loser's never shows


def test_replace_carries_its_own_metadata(store):
    etag = store.put("images/a.png", b"old", metadata={"sha256": "old"}, if_absent=True)
    store.put("images/a.png", b"new", metadata={"sha256": "new"}, if_match=etag)
    assert store.head("images/a.png").metadata == {"sha256": "new"}


def test_fenced_delete_where_the_server_honours_it(store, request):
    etag = store.put("x.json", b"1")
    store.put("x.json", b"2", if_match=etag)
    if request.node.callspec.params["store"] == "rgw":
        store.delete("x.json", if_match=etag)  # RGW ignores If-Match on delete (S3 notes):
        assert store.head("x.json") is None  # why the lease never relies on it
        return
    with pytest.raises(VersionChanged):
        store.delete("x.json", if_match=etag)
    assert store.get("x.json") == b"2"
    store.delete("x.json", if_match=store.head("x.json").etag)
    assert store.head("x.json") is None


# -- LocalStore: metadata atomic with content ----------------------------------------------


def test_local_metadata_never_describes_other_content(tmp_path):
    """The old store wrote the content, then a sidecar named after the key: a crash between the
    two, or two writers interleaving, left metadata describing the wrong bytes."""
    store = LocalStore(tmp_path / "out")
    store.put("images/a.png", b"A", metadata={"sha256": "A"})
    path = tmp_path / "out" / "images" / "a.png"
    path.write_bytes(b"B")  # another writer's content lands without metadata (or crashed)
    assert store.head("images/a.png").metadata == {}
    path.write_bytes(b"A")
    assert store.head("images/a.png").metadata == {"sha256": "A"}


def test_local_listing_hides_metadata_and_locks(tmp_path):
    store = LocalStore(tmp_path / "out")
    etag = store.put("meta/a.json", b"1", metadata={"k": "v"}, if_absent=True)
    store.put("meta/a.json", b"2", if_match=etag)
    store.delete("meta/a.json", if_match=store.head("meta/a.json").etag)
    assert [o.key for o in store.list()] == []
    assert not [p for p in (tmp_path / "out" / "meta").iterdir() if p.name.endswith(".meta")]


def test_local_conditional_ops_are_atomic_between_writers(tmp_path):
    """Many threads race conditional replaces from the same version: exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    store = LocalStore(tmp_path / "out")
    etag = store.put("lease.json", b"base")

    def attempt(n: int) -> bool:
        try:
            store.put("lease.json", f"w{n}".encode(), if_match=etag)
            return True
        except VersionChanged:
            return False

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(attempt, range(32)))
    assert wins.count(True) == 1
    assert store.get("lease.json") == f"w{wins.index(True)}".encode()


"""LocalStore and S3Store (against moto) keep the same contract: round trips, conditional
create, size caps, metadata, prefix listing, deletes, and refusing keys that escape the root."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from klein_ray.config import StorageConfig
from klein_ray.storage import (
    AlreadyExists,
    LocalStore,
    NotFound,
    ObjectInfo,
    StorageError,
    TooLarge,
    check_key,
    open_store,
)
from klein_ray.storage.s3 import S3Store
from klein_ray.uris import local_path, split_s3

UNSAFE_KEYS = ["../x", "/abs", "a//b", "a\\b", "", "a/../b", "./a", "a/.", "a/", ".."]


@pytest.fixture(scope="module")
def moto_client(moto_s3):
    return moto_s3.client()  # one test-side client per module: clients are slow to make


@pytest.fixture
def s3_server(moto_s3, s3_env):
    return s3_env(moto_s3)


@pytest.fixture
def bucket(s3_server, moto_client) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    moto_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(store, a way to write a sibling object outside the store's root)."""
    if request.param == "local":
        root = tmp_path / "out" / "some" / "prefix"
        store = open_store(str(root))
        assert isinstance(store, LocalStore)

        def put_outside(rel: str, data: bytes) -> None:
            p = tmp_path / "out" / "some" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

        return store, put_outside
    bucket = request.getfixturevalue("bucket")
    client = request.getfixturevalue("moto_client")
    store = open_store(f"s3://{bucket}/some/prefix")
    assert isinstance(store, S3Store)

    def put_outside(rel: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"some/{rel}", Body=data)

    return store, put_outside


@pytest.fixture
def store(backend):
    return backend[0]


# -- round trips --------------------------------------------------------------------------


def test_put_get_round_trip(store):
    payload = bytes(range(256)) * 10
    store.put("images/a.png", payload, content_type="image/png")
    assert store.get("images/a.png") == payload
    store.put("images/a.png", b"replaced")
    assert store.get("images/a.png") == b"replaced"
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_get_missing_is_not_found(store):
    with pytest.raises(NotFound):
        store.get("nope/missing.png")
    with pytest.raises(NotFound):
        store.get("missing")
    assert issubclass(NotFound, StorageError)


def test_if_absent_is_a_conditional_create(store):
    store.put("meta/a.json", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put("meta/a.json", b"second", if_absent=True)
    assert store.get("meta/a.json") == b"first"
    # An unconditional put still overwrites.
    store.put("meta/a.json", b"third")
    assert store.get("meta/a.json") == b"third"


def test_get_max_bytes(store):
    store.put("big", b"x" * 1000)
    assert store.get("big", max_bytes=1000) == b"x" * 1000
    assert store.get("big", max_bytes=5000) == b"x" * 1000
    with pytest.raises(TooLarge):
        store.get("big", max_bytes=999)
    with pytest.raises(TooLarge):
        store.get("big", max_bytes=0)
    with pytest.raises(NotFound):
        store.get("absent", max_bytes=10)


def test_head_with_metadata(store):
    store.put("images/a.png", b"12345", content_type="image/png", metadata={"sha256": "abc123"})
    info = store.head("images/a.png")
    assert isinstance(info, ObjectInfo)
    assert info.key == "images/a.png" and info.size == 5
    assert info.metadata == {"sha256": "abc123"}
    assert store.head("images/missing.png") is None


def test_head_without_metadata(store):
    store.put("plain", b"abc")
    info = store.head("plain")
    assert info is not None and info.size == 3 and not info.metadata


def test_list_prefix_relative_keys_in_order(backend):
    store, put_outside = backend
    keys = ["meta/b.json", "images/c.png", "meta/a.json", "images/a.png", "meta/sub/z.json", "top"]
    for k in keys:
        store.put(k, k.encode())
    # Siblings of the store's root in the same bucket/directory: never listed.
    put_outside("prefix2/meta/x.json", b"outside")
    put_outside("prefixmeta/y.json", b"outside")
    put_outside("other.json", b"outside")

    listed = list(store.list("meta/"))
    assert [o.key for o in listed] == ["meta/a.json", "meta/b.json", "meta/sub/z.json"]
    assert [o.size for o in listed] == [len(k) for k in ["meta/a.json", "meta/b.json", "meta/sub/z.json"]]
    assert [o.key for o in store.list("images/")] == ["images/a.png", "images/c.png"]
    assert [o.key for o in store.list("nothing/")] == []
    # Full key order across files and directories: see test_list_order_interleaving_*.
    assert sorted(o.key for o in store.list()) == sorted(keys)
    for o in store.list():
        assert store.get(o.key) == o.key.encode()


def test_list_empty_store(store):
    assert list(store.list()) == []
    assert list(store.list("meta/")) == []


def test_delete(store):
    store.put("images/a.png", b"1", metadata={"sha256": "x"})
    store.put("images/b.png", b"2")
    store.delete("images/a.png")
    assert store.head("images/a.png") is None
    with pytest.raises(NotFound):
        store.get("images/a.png")
    assert [o.key for o in store.list()] == ["images/b.png"]
    store.delete("images/a.png")  # deleting a missing key is fine
    store.delete("never/there")
    # A key can be created again after delete, conditionally too.
    store.put("images/a.png", b"again", if_absent=True)
    assert store.get("images/a.png") == b"again"


def test_url_of(store):
    assert store.url_of("meta/a.json").endswith("/some/prefix/meta/a.json")


# -- unsafe keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_check_key_refuses_unsafe_keys(key):
    with pytest.raises(ValueError):
        check_key(key)


@pytest.mark.parametrize("key", ["a", "a/b", "images/x.png", "a.b/c..d", "...a", "a/.hidden"])
def test_check_key_accepts_safe_keys(key):
    assert check_key(key) == key


def test_unsafe_key_put_raises_value_error(backend):
    store, _ = backend
    for key in UNSAFE_KEYS:
        with pytest.raises(ValueError):
            store.put(key, b"evil")
        with pytest.raises(ValueError):
            store.put(key, b"evil", if_absent=True)
    assert list(store.list()) == []


@pytest.mark.parametrize("op", ["get", "head", "delete"])
def test_unsafe_key_read_and_delete_raise_value_error(backend, request, op):
    store, _ = backend
    for key in ["../x", "/abs", "a//b", "a\\b", ""]:
        with pytest.raises(ValueError):
            getattr(store, op)(key)


def test_download_streams_an_object_to_a_file(store, tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB, more than one read
    store.put("models/weights.bin", data)
    dest = tmp_path / "copy.bin"
    store.download("models/weights.bin", dest)
    assert dest.read_bytes() == data


def test_download_of_a_missing_or_unsafe_key(store, tmp_path):
    with pytest.raises(NotFound):
        store.download("models/missing.bin", tmp_path / "x")
    for key in ["../x", "a//b", ""]:
        with pytest.raises(ValueError):
            store.download(key, tmp_path / "y")
    assert not (tmp_path / "y").exists()


# -- LocalStore specifics -----------------------------------------------------------------


def _snapshot(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_local_store_writes_nothing_outside_its_root(tmp_path):
    outer = tmp_path / "outer"
    root = outer / "root"
    outer.mkdir()
    (outer / "keep.txt").write_text("x")
    before = _snapshot(outer)
    store = LocalStore(root)
    store.put("images/a.png", b"1", metadata={"sha256": "s"})
    store.put("meta/a.json", b"2", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put("meta/a.json", b"3", if_absent=True)
    store.put("deep/er/key", b"4")
    for key in UNSAFE_KEYS:
        with pytest.raises(ValueError):
            store.put(key, b"evil")
    store.delete("images/a.png")
    after = _snapshot(outer)
    new = after - before
    assert all(p == "root" or p.startswith("root" + os.sep) for p in new), new
    assert before <= after
    # No temporaries left behind inside the root either.
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert (outer / "keep.txt").read_text() == "x"


def test_local_store_failed_conditional_create_leaves_no_temporaries(tmp_path):
    store = LocalStore(tmp_path)
    store.put("k", b"1", if_absent=True)
    for _ in range(3):
        with pytest.raises(AlreadyExists):
            store.put("k", b"2", if_absent=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_local_store_list_hides_sidecars_and_temporaries(tmp_path):
    store = LocalStore(tmp_path)
    store.put("a", b"1", metadata={"m": "v"})
    (tmp_path / ".a.123.tmp").write_bytes(b"partial")
    assert [o.key for o in store.list()] == ["a"]


def test_local_store_get_of_a_directory_is_not_found(tmp_path):
    store = LocalStore(tmp_path)
    store.put("dir/file", b"1")
    with pytest.raises(NotFound):
        store.get("dir")
    assert store.head("dir") is None


def test_local_store_accepts_file_uri(tmp_path):
    store = open_store(tmp_path.as_uri())
    assert isinstance(store, LocalStore) and store.root == tmp_path
    store.put("a", b"1")
    assert (tmp_path / "a").read_bytes() == b"1"


# -- helpers ------------------------------------------------------------------------------


def test_open_store_refuses_other_schemes():
    for uri in ("http://host/x", "ftp://host/x", "gs://b/x"):
        with pytest.raises(ValueError):
            open_store(uri)


def test_split_s3():
    assert split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        split_s3("s3:///nobucket")
    with pytest.raises(ValueError):
        split_s3("/local/path")


def test_local_path():
    assert local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    assert local_path("/tmp/x") == Path("/tmp/x")
    assert local_path("rel").is_absolute()
    with pytest.raises(ValueError):
        local_path("file://remote-host/x")


def test_s3_store_root_without_prefix(bucket, moto_client):
    store = S3Store(f"s3://{bucket}", StorageConfig())
    store.put("a/b", b"1")
    assert [o.key for o in store.list()] == ["a/b"]
    assert moto_client.get_object(Bucket=bucket, Key="a/b")["Body"].read() == b"1"


def test_s3_store_writes_under_its_prefix(bucket, moto_client):
    store = open_store(f"s3://{bucket}/some/prefix/")
    store.put("meta/a.json", b"{}")
    keys = [o["Key"] for o in moto_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["some/prefix/meta/a.json"]


# -- once bugs, now pinned -----------------------------------------------------------------


def test_list_order_interleaving_files_and_directories(store, request):
    for k in ["b", "a/x", "a.txt"]:
        store.put(k, b"1")
    assert [o.key for o in store.list()] == ["a.txt", "a/x", "b"]


def test_overwrite_without_metadata_clears_old_metadata(store, request):
    store.put("k", b"1", metadata={"sha256": "old"})
    store.put("k", b"2")
    assert store.get("k") == b"2"
    assert not store.head("k").metadata

"""The compile cache's I/O: entries kept once under run.compile_cache (a directory or s3://),
and a cache that cannot be read or written costs a compile, never a load, and logs no secret."""

from __future__ import annotations

import logging

from klein_ray.assets.compilecache import CompileCache, cache_uri
from klein_ray.config import JobConfig, RunConfig, StorageConfig


def config(uri: str | None, cache_dir: str = "~/.cache/klein-ray", **storage) -> JobConfig:
    return JobConfig(run=RunConfig(compile_cache=uri, cache_dir=cache_dir), storage=StorageConfig(**storage))


def test_default_location_is_under_each_nodes_cache_dir(tmp_path):
    assert cache_uri(config(None, cache_dir=str(tmp_path))) == str(tmp_path / "compile")


def test_an_entry_is_written_once_and_read_back(tmp_path):
    cache = CompileCache(config(str(tmp_path / "cc")))
    assert cache.read("k1") is None
    assert cache.write("k1", b"first") is True
    assert cache.write("k1", b"second") is False  # an entry already there stays
    assert cache.read("k1") == b"first"
    assert cache.read("k2") is None


def test_on_s3_too(moto_s3, s3_env):
    server = s3_env(moto_s3)
    bucket = server.new_bucket()
    cache = CompileCache(config(f"s3://{bucket}/klein-ray-compile", endpoint_url=server.endpoint))
    assert cache.read("k") is None and cache.write("k", b"\x00" * 1000) is True
    assert CompileCache(config(f"s3://{bucket}/klein-ray-compile", endpoint_url=server.endpoint)).read("k") == b"\x00" * 1000
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["klein-ray-compile/k.bin"]


def test_an_unreachable_cache_is_a_miss_and_its_secret_stays_out_of_the_log(caplog, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETSECRET")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    from klein_ray.storage import reset_clients

    reset_clients()
    cfg = config("s3://bucket/cc", endpoint_url="http://127.0.0.1:9", max_attempts=1,
                 connect_timeout=0.2, read_timeout=0.2, outer_retry_seconds=0)
    cache = CompileCache(cfg)
    with caplog.at_level(logging.WARNING, logger="klein_ray"):
        assert cache.read("k") is None
        assert cache.write("k", b"data") is False
    text = caplog.text
    assert "compile cache" in text and "secret" not in text.lower() and "AKID" not in text
    reset_clients()


def test_a_cache_path_that_is_a_file_is_a_miss(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cache = CompileCache(config(str(blocker)))
    assert cache.read("k") is None
    assert cache.write("k", b"data") is False

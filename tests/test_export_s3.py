"""The export into S3: shards under a prefix that the real loaders read once downloaded. On moto
(the fast tier) from the shared local output; on Ceph RGW (the ceph tier) with S3 on both sides,
the output rendered into a bucket. Shards go up through ``Store.put_file``, whose multipart path
is forced here with a small part size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from exportcheck import committed, datasets_rows, render_manifest, tree, webdataset_samples
from localrun import job, render

import klein_ray.storage.s3 as s3
from klein_ray.commands.export import export_output
from klein_ray.config import StorageConfig
from klein_ray.storage import open_store


def _download(uri: str, local: Path) -> Path:
    store = open_store(uri)
    for obj in store.list():
        (local / obj.key).parent.mkdir(parents=True, exist_ok=True)
        store.download(obj.key, local / obj.key)
    return local


def _round_trip(bucket: str, out: str, tmp_path: Path) -> None:
    truth = committed(open_store(out))
    for fmt in ("webdataset", "parquet"):
        dest = f"s3://{bucket}/datasets/{fmt}"
        summary = export_output(out, fmt, dest, rows_per_shard=4)
        assert (summary.built, summary.samples, summary.failed, summary.rejected) == (3, 8, 1, 2)
        local = _download(dest, tmp_path / fmt)
        loaded = datasets_rows(local, tmp_path / "hf-cache")
        if fmt == "webdataset":
            samples = webdataset_samples(local)
            assert {i: (s["image"], s["prompt"]) for i, s in samples.items()} == \
                {i: (t["image"], t["prompt"]) for i, t in truth.items()}
            assert sorted(r["json"]["id"] for r in loaded) == sorted(truth)
        else:
            assert {r["id"]: (r["image"]["bytes"], r["prompt"]) for r in loaded} == \
                {i: (t["image"], t["prompt"]) for i, t in truth.items()}
        again = export_output(out, fmt, dest, rows_per_shard=4)
        assert (again.built, again.skipped) == (0, 3)
        assert tree(_download(dest, tmp_path / f"{fmt}-again")) == tree(local)


def test_export_into_s3_on_moto(export_source, moto_s3, s3_env, tmp_path):
    _round_trip(s3_env(moto_s3).new_bucket(), export_source[0], tmp_path)


@pytest.mark.slow
def test_export_between_s3_prefixes_on_rgw(rgw, s3_env, tmp_path, tiny_models):
    bucket = s3_env(rgw).new_bucket()
    uri, _ = render_manifest(tmp_path)
    out = f"s3://{bucket}/renders/out"
    assert render(uri, out, job(tiny_models))[0]["committed"] == 8
    _round_trip(bucket, out, tmp_path)


@pytest.mark.parametrize("server", ["moto_s3", pytest.param("rgw", marks=[pytest.mark.slow, pytest.mark.ceph])])
def test_put_file_uploads_large_files_in_parts(server, request, s3_env, tmp_path, monkeypatch):
    """Past MULTIPART_BYTES a shard goes up as a multipart upload (5 MiB parts, the S3 minimum):
    the object is the file, byte for byte, and its ETag says it was assembled from 3 parts."""
    found = s3_env(request.getfixturevalue(server))
    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 * 1024 * 1024)
    path = tmp_path / "shard.tar"
    path.write_bytes(os.urandom(11 * 1024 * 1024))
    store = open_store(f"s3://{found.new_bucket()}/x", StorageConfig())
    store.put_file("big.tar", path, content_type="application/x-tar")
    assert store.get("big.tar") == path.read_bytes()
    assert store.head("big.tar").etag.endswith("-3")

"""Model sources: classifying and normalising, the once-per-node s3:// sync (against moto), and a
variant's single transformer file (local, s3:// once per node, hf:// through the Hub cache)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from klein_ray.assets.modelsource import (
    COMPLETE,
    ModelSourceError,
    classify,
    normalise,
    resolve,
    resolve_file,
    sync_s3,
)
from klein_ray.config import StorageConfig

TREE = {
    "model_index.json": json.dumps({"_class_name": "Flux2KleinPipeline"}).encode(),
    "transformer/config.json": json.dumps({"num_layers": 1}).encode(),
    "transformer/diffusion_pytorch_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "scheduler/scheduler_config.json": b"{}",
    "text_encoder/model.safetensors": b"te-weights",
}
SKIPPED = {
    "flux-2-klein-4b.safetensors": b"BFL single-file weights: must not be synced",
    "ae.sft": b"skip me too",
}


@pytest.fixture(scope="module")
def moto_client(moto_s3):
    return moto_s3.client()


@pytest.fixture
def bucket(moto_s3, s3_env, moto_client) -> str:
    s3_env(moto_s3)
    name = f"t-{uuid.uuid4().hex[:12]}"
    moto_client.create_bucket(Bucket=name)
    return name


def upload(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}" if prefix else rel, Body=data)


def empty_bucket(client, bucket: str) -> None:
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def tree_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# -- classify / normalise -----------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-9B", "org/model",
    "a/b", "user_1/my.model-v2",
])
def test_hub_ids(source):
    assert classify(source) == "hub"
    assert normalise(source) == source


@pytest.mark.parametrize("source", ["s3://bucket/models/klein/", "s3://bucket/models/klein", "s3://bucket"])
def test_s3_sources(source):
    assert classify(source) == "s3"
    assert normalise(source) == source


def test_local_sources(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    assert classify(str(model)) == "local"
    assert classify(model.as_uri()) == "local"
    assert classify("./model") == "local"
    assert classify("model") == "local"  # exists relative to the CWD
    assert classify("./does-not-exist-yet") == "local"  # explicit path syntax
    assert classify("/abs/does/not/exist") == "local"
    assert classify("~/some-model") == "local"
    # Local sources become absolute, so every worker sees the same path.
    assert normalise("./model") == str(model)
    assert normalise("model") == str(model)
    assert normalise(model.as_uri()) == str(model)
    assert Path(normalise("~/some-model")).is_absolute()
    assert "~" not in normalise("~/some-model")


@pytest.mark.parametrize("source", [
    "just-a-name", "a/b/c", "http://example.com/model", "ftp://host/model", "org/model name",
    "-org/model", "org/", "gs://bucket/model", "hf:org/model",
])
def test_garbage_sources_raise(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing of these names exists here
    with pytest.raises(ModelSourceError) as info:
        classify(source)
    assert repr(source) in str(info.value)
    with pytest.raises(ModelSourceError):
        normalise(source)


def test_s3_source_without_bucket_raises_value_error():
    # Not a ModelSourceError but a ValueError (its base); the driver catches both.
    with pytest.raises(ValueError):
        classify("s3://")
    with pytest.raises(ValueError):
        classify("s3:///prefix")


def test_resolve_local_requires_model_index(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ModelSourceError) as info:
        resolve(str(model), str(tmp_path / "cache"), StorageConfig())
    assert "model_index.json" in str(info.value)
    (model / "model_index.json").write_text("{}")
    assert resolve(str(model), str(tmp_path / "cache"), StorageConfig()) == str(model)
    assert resolve("org/model", str(tmp_path / "cache"), StorageConfig()) == "org/model"


# -- s3:// sync ---------------------------------------------------------------------------


def test_sync_s3_copies_the_diffusers_tree(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "models/klein", {**TREE, **SKIPPED})
    # A sibling prefix sharing the name's start must not leak in.
    upload(moto_client, bucket, "models/klein-other", {"model_index.json": b"other"})
    cache = tmp_path / "cache"
    dest = sync_s3(f"s3://{bucket}/models/klein/", cache, StorageConfig())
    assert dest.is_dir() and dest.is_relative_to(cache)
    files = tree_of(dest)
    marker = files.pop(COMPLETE)
    assert files == TREE
    assert str(len(TREE)).encode() in marker
    assert not any(p.name.endswith(".part") for p in dest.rglob("*"))
    assert not (dest / "flux-2-klein-4b.safetensors").exists()
    # resolve() goes through the same sync and returns the cached directory.
    assert resolve(f"s3://{bucket}/models/klein", str(cache), StorageConfig()) == str(dest)


def test_sync_s3_keeps_nested_weight_files(bucket, moto_client, tmp_path):
    # Only root-level single files are skipped; the transformer's own weights are not.
    upload(moto_client, bucket, "m", TREE)
    dest = sync_s3(f"s3://{bucket}/m", tmp_path, StorageConfig())
    assert (dest / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        TREE["transformer/diffusion_pytorch_model.safetensors"]
    assert (dest / "text_encoder" / "model.safetensors").is_file()


def test_sync_s3_bucket_root(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "", {**TREE, **SKIPPED})
    dest = sync_s3(f"s3://{bucket}", tmp_path, StorageConfig())
    files = tree_of(dest)
    files.pop(COMPLETE)
    assert files == TREE


def test_second_sync_downloads_nothing(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "models/klein", TREE)
    first = sync_s3(f"s3://{bucket}/models/klein", tmp_path, StorageConfig())
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    empty_bucket(moto_client, bucket)  # anything still to download would now fail
    second = sync_s3(f"s3://{bucket}/models/klein", tmp_path, StorageConfig())
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == before
    files = tree_of(second)
    files.pop(COMPLETE)
    assert files == TREE


def test_different_prefixes_get_different_cache_dirs(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "a", TREE)
    upload(moto_client, bucket, "b", {**TREE, "model_index.json": b'{"b": 1}'})
    da = sync_s3(f"s3://{bucket}/a", tmp_path, StorageConfig())
    db = sync_s3(f"s3://{bucket}/b", tmp_path, StorageConfig())
    assert da != db
    assert (db / "model_index.json").read_bytes() == b'{"b": 1}'
    assert (da / "model_index.json").read_bytes() == TREE["model_index.json"]


def test_prefix_without_model_index_raises(bucket, moto_client, tmp_path):
    tree = {k: v for k, v in TREE.items() if k != "model_index.json"}
    upload(moto_client, bucket, "models/broken", {**tree, **SKIPPED})
    with pytest.raises(ModelSourceError) as info:
        sync_s3(f"s3://{bucket}/models/broken", tmp_path, StorageConfig())
    assert "model_index.json" in str(info.value)
    assert not list(tmp_path.rglob(COMPLETE))
    # Once the index appears, a later sync completes (the failed one left no marker).
    upload(moto_client, bucket, "models/broken", {"model_index.json": TREE["model_index.json"]})
    dest = sync_s3(f"s3://{bucket}/models/broken", tmp_path, StorageConfig())
    assert (dest / COMPLETE).is_file()


def test_empty_prefix_raises(bucket, tmp_path):
    with pytest.raises(ModelSourceError):
        sync_s3(f"s3://{bucket}/nothing/here", tmp_path, StorageConfig())


def test_only_a_root_single_file_raises(bucket, moto_client, tmp_path):
    """A prefix holding only BFL single-file weights is not a diffusers directory."""
    upload(moto_client, bucket, "bfl", SKIPPED)
    with pytest.raises(ModelSourceError):
        sync_s3(f"s3://{bucket}/bfl", tmp_path, StorageConfig())
    assert not list(tmp_path.rglob("*.safetensors"))


def test_sync_refuses_dot_dot_keys(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "evil", TREE)
    moto_client.put_object(Bucket=bucket, Key="evil/transformer/../../../escape.json", Body=b"x")
    keys = [o["Key"] for o in moto_client.list_objects_v2(Bucket=bucket, Prefix="evil/")["Contents"]]
    if "evil/transformer/../../../escape.json" not in keys:
        pytest.skip("the server normalised the key")
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError):
        sync_s3(f"s3://{bucket}/evil", cache, StorageConfig())
    assert not list(tmp_path.rglob("escape.json"))


def test_sync_refuses_absolute_keys(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "evil", TREE)
    outside = tmp_path / "outside" / "escape.json"
    key = f"evil/{outside}"  # 'evil//tmp/.../escape.json': rel starts with '/'
    moto_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    keys = [o["Key"] for o in moto_client.list_objects_v2(Bucket=bucket, Prefix="evil/")["Contents"]]
    assert key in keys, keys
    with pytest.raises(ModelSourceError):
        sync_s3(f"s3://{bucket}/evil", tmp_path / "cache", StorageConfig())
    assert not outside.exists()


# -- a variant's single-file transformer ------------------------------------------------------


def test_resolve_file_local(tmp_path):
    weights = tmp_path / "klein-fp8.safetensors"
    weights.write_bytes(b"x")
    assert resolve_file(str(weights), str(tmp_path / "cache"), StorageConfig()) == str(weights)
    assert resolve_file(weights.as_uri(), str(tmp_path / "cache"), StorageConfig()) == str(weights)
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_file(str(tmp_path / "absent.safetensors"), str(tmp_path / "cache"), StorageConfig())


def test_resolve_file_s3_downloads_once_per_node(bucket, moto_client, tmp_path):
    upload(moto_client, bucket, "bfl", {"flux-2-klein-4b-fp8.safetensors": b"fp8 weights"})
    ref = f"s3://{bucket}/bfl/flux-2-klein-4b-fp8.safetensors"
    first = Path(resolve_file(ref, str(tmp_path), StorageConfig()))
    assert first.name == "flux-2-klein-4b-fp8.safetensors" and first.read_bytes() == b"fp8 weights"
    assert first.is_relative_to(tmp_path) and not list(tmp_path.rglob("*.part"))
    empty_bucket(moto_client, bucket)  # a second download would now fail
    assert Path(resolve_file(ref, str(tmp_path), StorageConfig())) == first
    with pytest.raises(ModelSourceError, match="absent.safetensors"):
        resolve_file(f"s3://{bucket}/bfl/absent.safetensors", str(tmp_path), StorageConfig())
    assert not list(tmp_path.rglob("absent.safetensors"))


def test_resolve_file_hub_goes_through_the_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(**kw):
        calls.append(kw)
        return "/hf-cache/snapshot/flux-2-klein-4b-nvfp4.safetensors"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = resolve_file("hf://black-forest-labs/FLUX.2-klein-4b-nvfp4@main/flux-2-klein-4b-nvfp4.safetensors",
                       str(tmp_path), StorageConfig())
    assert got == "/hf-cache/snapshot/flux-2-klein-4b-nvfp4.safetensors"
    assert calls == [{"repo_id": "black-forest-labs/FLUX.2-klein-4b-nvfp4",
                      "filename": "flux-2-klein-4b-nvfp4.safetensors", "revision": "main"}]
    with pytest.raises(ModelSourceError, match="hf://org/repo/file"):
        resolve_file("hf://org/file.safetensors", str(tmp_path), StorageConfig())

"""Model sources: a Hub repo id, a local diffusers directory, or an ``s3://`` prefix of one.

An ``s3://`` source is copied once per node into the cache directory: the first actor on a node
takes a file lock and syncs, the others wait on the lock and find the ``.complete`` marker,
which is written last. BFL-format single files at the prefix root are skipped: diffusers does
not need them and they are as large as the transformer itself.

A variant's ``transformer`` names one such single file instead (a local path, ``s3://bucket/key``
or ``hf://org/repo/file``): ``resolve_file`` makes it a local path for the model layer, an
``s3://`` file copied once per node under the same lock-and-marker rule, an ``hf://`` one through
the Hugging Face cache that ``from_pretrained`` uses for Hub sources.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
from pathlib import Path

from klein_ray.config import StorageConfig
from klein_ray.storage import StorageError, check_key, open_store
from klein_ray.types import TEST_MODEL_MARKER
from klein_ray.uris import FILE, S3, is_s3, kind_of, local_path, split_s3

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
COMPLETE = ".complete"
HF_SCHEME = "hf://"


class ModelSourceError(ValueError):
    """The variant's model source cannot be used."""


def classify(source: str) -> str:
    """'s3', 'local' or 'hub' (raises for anything else)."""
    kind = kind_of(source)
    if kind == S3:
        split_s3(source)
        return "s3"
    if kind == FILE:
        if source.startswith(("file://", "/", ".", "~")) or local_path(source).exists():
            return "local"
        if REPO_ID.fullmatch(source):
            return "hub"
    raise ModelSourceError(
        f"model source {source!r} is neither an existing directory, an s3:// prefix nor a Hub repo id"
    )


def normalise(source: str) -> str:
    """Make local sources absolute on the driver, so every worker sees the same path."""
    if classify(source) == "local":
        return str(local_path(source))
    return source


def resolve(source: str, cache_dir: str, storage: StorageConfig) -> str:
    """What ``from_pretrained`` should load: a local directory or a Hub repo id."""
    kind = classify(source)
    if kind == "hub":
        return source
    if kind == "local":
        path = local_path(source)
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(f"model source {path}: no model_index.json (not a diffusers directory)")
        return str(path)
    return str(sync_s3(source, Path(cache_dir).expanduser(), storage))


def sync_s3(source: str, cache_dir: Path, storage: StorageConfig) -> Path:
    bucket, prefix = split_s3(source)
    digest = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:16]
    dest = cache_dir / "models" / digest
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one syncer per node; the rest wait here
        if (dest / COMPLETE).is_file():
            return dest
        try:
            count = _download_tree(open_store(source, storage), dest, source)
        except StorageError as exc:
            raise ModelSourceError(f"model source {source}: {exc}") from None
        if not (dest / "model_index.json").is_file():
            raise ModelSourceError(f"model source {source}: no model_index.json under this prefix")
        (dest / COMPLETE).write_text(f"{count} files from {source}\n")
        return dest


def _download_tree(store, dest: Path, source: str) -> int:
    """Every object under the store's root into ``dest`` (skipping what is already there at its
    size); each file is written beside its target and renamed, so none is ever seen half."""
    count = 0
    for obj in store.list():
        if not obj.key or obj.key.endswith("/") or _skip(obj.key):  # folder markers, BFL files
            continue
        try:
            target = dest / check_key(obj.key)  # never outside the cache (no '..', '//', '/')
        except ValueError:
            raise ModelSourceError(f"model source {source}: unsafe key {obj.key!r}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and target.stat().st_size == obj.size):
            part = target.with_name(target.name + ".part")
            store.download(obj.key, part)
            part.replace(target)
        count += 1
    return count


def resolve_file(ref: str, cache_dir: str, storage: StorageConfig) -> str:
    """A local path to the single file ``ref`` names (path or file://, s3://, hf://)."""
    if is_s3(ref):
        return str(sync_s3_file(ref, Path(cache_dir).expanduser(), storage))
    if ref.startswith(HF_SCHEME):
        return _hub_file(ref)
    path = local_path(ref)
    if not path.is_file():
        raise ModelSourceError(f"transformer file {path}: not found")
    return str(path)


def sync_s3_file(ref: str, cache_dir: Path, storage: StorageConfig) -> Path:
    """``s3://bucket/dir/name`` copied once per node to ``cache_dir/files/<digest>/name``."""
    bucket, key = split_s3(ref)
    folder, _, name = key.rpartition("/")
    if not name:
        raise ModelSourceError(f"transformer file {ref}: no object key")
    digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:16]
    dest = cache_dir / "files" / digest
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the rest wait here
        if (dest / COMPLETE).is_file() and (dest / name).is_file():
            return dest / name
        part = dest / f"{name}.part"
        try:
            open_store(f"s3://{bucket}/{folder}", storage).download(name, part)
        except StorageError as exc:
            part.unlink(missing_ok=True)
            raise ModelSourceError(f"transformer file {ref}: {exc}") from None
        part.replace(dest / name)
        (dest / COMPLETE).write_text(f"{ref}\n")
        return dest / name


def _hub_file(ref: str) -> str:
    """``hf://org/repo[@revision]/path/file`` through the Hugging Face cache."""
    parts = ref[len(HF_SCHEME):].split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelSourceError(f"transformer file {ref!r}: expected hf://org/repo/file")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo_id=repo, filename="/".join(parts[2:]), revision=revision or None)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise ModelSourceError(f"transformer file {ref}: {exc}") from None


def is_test_model(source: str) -> bool:
    """Whether a (normalised) source is the tiny random model, whose images are noise."""
    return not is_s3(source) and (local_path(source) / TEST_MODEL_MARKER).is_file()


def _skip(rel: str) -> bool:
    # Root-level weight files are BFL's single-file format, not part of the diffusers layout.
    return "/" not in rel and rel.endswith((".safetensors", ".sft", ".ckpt", ".pth"))

"""The local-directory implementation of ``Store`` (paths and ``file://`` URIs).

Writes go beside the target and are renamed into place, so a reader never sees half a file.
- A version (etag) is the sha256 of the content: no state beside the file can disagree with it.
- ``if_absent`` is an atomic hard link; ``if_match`` and fenced deletes compare and swap under
  an advisory lock (``fcntl.flock``) on the key's directory itself (no lock file is left
  behind), so they are atomic between processes on this host (a local output is written from
  one host).
- User metadata lives in a dot-file named after the content's sha256
  (``.{name}.{sha256}.meta``), written BEFORE the content appears: metadata can never be read
  for other content than it was written with, which is what S3 gives by storing both in one
  object (a sidecar named after the key, written after the content, could describe the wrong
  bytes after a crash or a race).
Listings skip every dot-file (temporaries, metadata).

The disk's own failures (full, read-only, permission denied, I/O error) are ``StorageUnavailable``
naming the path, like an S3 server that will not serve: the driver stops with exit 75 and the
lease released, instead of failing every row. A write that fails leaves no temporary behind;
``sweep`` removes what a killed process left (the driver calls it under the lease). ``reserve``
keeps 64 KiB aside, spent on the first write that finds the disk full, so that a run stopping
on a full disk can still release its lease.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from klein_ray.storage.base import (
    AlreadyExists,
    NotFound,
    ObjectInfo,
    StorageUnavailable,
    Store,
    TooLarge,
    VersionChanged,
    Versioned,
    check_key,
)
from klein_ray.uris import local_path

_CHUNK = 1024 * 1024
RESERVE, RESERVE_BYTES = ".klein-ray-reserve", 64 * 1024  # room for the lease's release on a full disk


class LocalStore(Store):
    fenced_delete = True  # compare-and-delete under the key's lock

    def __init__(self, root: str | Path):
        self.root = local_path(str(root))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key, data, *, content_type=None, metadata=None, if_absent=False, if_match=None):
        path = self._path(key)
        with _disk_errors(path):
            try:
                return self._put(key, path, data, metadata, if_absent, if_match)
            except OSError as exc:  # the disk is full: spend the reserve on this write, once
                if exc.errno != errno.ENOSPC or not self._spend_reserve():
                    raise
                return self._put(key, path, data, metadata, if_absent, if_match)

    def reserve(self) -> None:
        try:
            with open(self.root / RESERVE, "wb") as fh:
                fh.write(b"\0" * RESERVE_BYTES)
        except OSError:
            (self.root / RESERVE).unlink(missing_ok=True)  # no room even for that: nothing kept

    def _spend_reserve(self) -> bool:
        try:
            (self.root / RESERVE).unlink()
        except FileNotFoundError:
            return False
        return True

    def _put(self, key: str, path: Path, data: bytes, metadata, if_absent: bool, if_match: str | None) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        etag = _etag(data)
        if metadata:  # first, so the content never appears without its metadata
            _write_atomic(_meta_path(path, etag), json.dumps(metadata, sort_keys=True).encode())
        # Write beside the target and rename, so a reader never sees half a file.
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(data)
            if if_absent:
                self._create(tmp, path, key, etag)
            elif if_match is not None:
                with _locked(path):
                    current = _file_etag(path)
                    if current != if_match:
                        raise VersionChanged(f"{key}: not at version {if_match}")
                    os.replace(tmp, path)
                _forget_meta(path, current, keep=etag)
            else:
                os.replace(tmp, path)
        except (AlreadyExists, VersionChanged):
            _forget_meta(path, etag, keep=_file_etag(path))
            raise
        except OSError:  # nothing half-written stays: neither the temporary nor unused metadata
            _forget_meta(path, etag, keep=_file_etag(path))
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return etag

    @staticmethod
    def _create(tmp: Path, path: Path, key: str, etag: str) -> None:
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            raise AlreadyExists(key) from None

    def get(self, key, max_bytes=None):
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1 if max_bytes is not None else -1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"{key}: larger than {max_bytes} bytes")
        return data

    def get_range(self, key, start, length):
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None

    def get_versioned(self, key, max_bytes=None):
        data = self.get(key, max_bytes)
        return Versioned(data, _etag(data))

    def head(self, key):
        path = self._path(key)
        etag = _file_etag(path)
        if etag is None:
            return None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return ObjectInfo(key, size, _read_meta(path, etag), etag, content_sha256=etag)

    def list(self, prefix=""):
        # Walk only the directory the prefix names, in S3's order (full keys, byte-wise).
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / head if head else self.root
        if not start.is_dir():
            return
        for full in _walk_sorted(start):
            key = full.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                yield ObjectInfo(key, full.stat().st_size)

    def delete(self, key, if_match=None):
        path = self._path(key)
        with _disk_errors(path), _locked(path) if path.parent.is_dir() else _nothing():
            current = _file_etag(path)
            if if_match is not None and current != if_match:
                if current is None:
                    return  # gone already: what the caller wanted
                raise VersionChanged(f"{key}: not at version {if_match}")
            path.unlink(missing_ok=True)
        if current is not None:
            _forget_meta(path, current, keep=None)

    def sweep(self) -> int:
        """Remove the temporaries that processes killed mid-write left under the root; the
        number removed. Call it only while no one else writes here (under the output's lease)."""
        removed = 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    Path(directory, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def put_file(self, key, path, *, content_type=None):
        """Copied beside the target and renamed into place, streamed (never whole in memory)."""
        target = self._path(key)
        with _disk_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

    def download(self, key, dest):
        try:
            shutil.copyfile(self._path(key), dest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path, chunk_bytes: int = _CHUNK) -> str:
    """The sha256 of a local file's content, streamed (the local ETag, a manifest file's content
    tag, an adapter file's identity); OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _file_etag(path: Path) -> str | None:
    """The sha256 of the file's content, streamed; None if it is not a file."""
    try:
        return file_sha256(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f"{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _meta_path(path: Path, etag: str) -> Path:
    return path.parent / f".{path.name}.{etag}.meta"


def _read_meta(path: Path, etag: str) -> dict[str, str]:
    try:
        return json.loads(_meta_path(path, etag).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _forget_meta(path: Path, etag: str | None, keep: str | None) -> None:
    """Drop the metadata of content no longer stored (never that of the content now there)."""
    if etag is not None and etag != keep:
        _meta_path(path, etag).unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock for the conditional operations on keys of ``path``'s directory
    (between processes): held on the directory itself, so nothing is left behind."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# The disk's own failures: nothing is wrong with the request, the storage will not take it.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise StorageUnavailable(f"{exc.filename or path}: {exc.strerror}") from exc
        raise


@contextmanager
def _nothing():
    yield


def _walk_sorted(directory: Path):
    """Files under ``directory`` in the order S3 lists their keys; dot-files are ours (temporaries,
    locks, metadata) and never listed."""
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    entries.sort(key=lambda p: p.name + "/" if p.is_dir() else p.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk_sorted(entry)
        elif entry.is_file():
            yield entry

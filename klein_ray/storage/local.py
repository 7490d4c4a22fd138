"""The local-directory implementation of ``Store`` (paths and ``file://`` URIs).

Writes go beside the target and are renamed into place, so a reader never sees half a file;
``if_absent`` is an atomic hard link. User metadata lives in a dot-file sidecar, which listings
skip like every dot-file (temporaries too).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from klein_ray.storage.base import AlreadyExists, NotFound, ObjectInfo, Store, TooLarge, check_key, local_path


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = local_path(str(root))
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key, data, *, content_type=None, metadata=None, if_absent=False):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half a file.
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        try:
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise AlreadyExists(key) from None
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if metadata:
            _write_sidecar(path, metadata)
        else:
            _sidecar(path).unlink(missing_ok=True)  # S3 replaces metadata with the object

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

    def head(self, key):
        path = self._path(key)
        if not path.is_file():
            return None
        return ObjectInfo(key, path.stat().st_size, _read_sidecar(path))

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

    def delete(self, key):
        path = self._path(key)
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)

    def download(self, key, dest):
        try:
            shutil.copyfile(self._path(key), dest)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None


def _walk_sorted(directory: Path):
    """Files under ``directory`` in the order S3 lists their keys; dot-files are ours (temporaries
    and metadata sidecars) and never listed."""
    entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
    entries.sort(key=lambda p: p.name + "/" if p.is_dir() else p.name)
    for entry in entries:
        if entry.is_dir():
            yield from _walk_sorted(entry)
        elif entry.is_file():
            yield entry


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}.meta"


def _write_sidecar(path: Path, metadata: dict[str, str]) -> None:
    _sidecar(path).write_text(json.dumps(metadata, sort_keys=True))


def _read_sidecar(path: Path) -> dict[str, str]:
    try:
        return json.loads(_sidecar(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}

"""One interface over local directories and S3-compatible buckets. Knows nothing of models or rows.

A ``Store`` is rooted at a URI (``s3://bucket/prefix`` or a local path / ``file://`` URI) and
addresses objects by keys relative to that root. Keys are checked so that nothing can be read or
written outside the root. S3 goes through boto3 with ``standard`` retries and checksums only
when required (S3-compatible servers reject or ignore the CRC32 headers newer boto3 sends).
"""

from __future__ import annotations

import os
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from klein_ray.config import StorageConfig


class StorageError(Exception):
    """A storage operation failed after retries."""


class NotFound(StorageError):
    pass


class AlreadyExists(StorageError):
    """A conditional create found the key taken."""


class TooLarge(StorageError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int
    metadata: dict[str, str] | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``) with no leading or trailing slash."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI with a bucket: {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def local_path(uri: str) -> Path:
    """A local path or ``file://`` URI as an absolute path."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {uri!r}")
        return Path(unquote(parsed.path)).absolute()
    return Path(uri).expanduser().absolute()


def check_key(key: str) -> str:
    """Refuse keys that could escape the root (absolute, ``..``, empty parts, backslashes)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class Store(ABC):
    """Objects under one root. Every key is relative to ``uri``."""

    uri: str

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, content_type: str | None = None,
        metadata: dict[str, str] | None = None, if_absent: bool = False,
    ) -> None:
        """Write ``data`` at ``key``; with ``if_absent`` raise AlreadyExists if the key is taken."""

    @abstractmethod
    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read ``key``; NotFound if missing, TooLarge past ``max_bytes`` (checked while reading)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and user metadata of ``key``, or None."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    def url_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"


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
    import json

    _sidecar(path).write_text(json.dumps(metadata, sort_keys=True))


def _read_sidecar(path: Path) -> dict[str, str]:
    import json

    try:
        return json.loads(_sidecar(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(cfg: StorageConfig):
    """A boto3 S3 client for ``cfg``, shared per process (clients are thread-safe)."""
    endpoint = cfg.resolved_endpoint()
    key = (endpoint, cfg.region, cfg.max_attempts, cfg.connect_timeout, cfg.read_timeout)
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
                connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Custom endpoints are rarely set up for virtual-hosted buckets.
                s3={"addressing_style": "path" if endpoint else "auto"},
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            _clients[key] = session.client(
                "s3", endpoint_url=endpoint, region_name=cfg.region or None, config=config
            )
        return _clients[key]


def open_store(uri: str, cfg: StorageConfig | None = None) -> Store:
    """The store rooted at ``uri``: S3 for ``s3://``, a local directory otherwise."""
    if is_s3(uri):
        from klein_ray.s3store import S3Store

        return S3Store(uri, cfg or StorageConfig())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI scheme: {uri!r} (use s3://, file:// or a path)")
    return LocalStore(uri)

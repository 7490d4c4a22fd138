"""The store interface, its errors and the URI helpers. Never imports its implementations.

A ``Store`` is rooted at a URI (``s3://bucket/prefix`` or a local path / ``file://`` URI) and
addresses objects by keys relative to that root. Keys are checked so that nothing can be read or
written outside the root. Knows nothing of models, rows or the output layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class StorageError(Exception):
    """A storage operation failed after retries."""


class StorageUnavailable(StorageError):
    """The storage could not be reached, or would not serve (connection errors, timeouts, 5xx,
    throttling), for longer than every retry: nothing is wrong with the request; try later."""


class Misconfigured(StorageError):
    """The storage endpoint never answered at all: a setting to fix, not an outage to wait out."""


class NotFound(StorageError):
    pass


class ConditionFailed(StorageError):
    """A conditional write's condition did not hold; nothing was written."""


class AlreadyExists(ConditionFailed):
    """A conditional create (``if_absent``) found the key taken."""


class VersionChanged(ConditionFailed):
    """A conditional replace or delete (``if_match``) found another version, or none."""


class TooLarge(StorageError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int
    metadata: dict[str, str] | None = None
    etag: str | None = None  # the version, for ``if_match``; listings leave it out
    content_sha256: str | None = None  # when the store knows it for certain (local: hashed)


@dataclass(frozen=True)
class Versioned:
    """An object's content and the version it was read at."""

    data: bytes
    etag: str


def check_key(key: str) -> str:
    """Refuse keys that could escape the root (absolute, ``..``, empty parts, backslashes)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class Store(ABC):
    """Objects under one root. Every key is relative to ``uri``."""

    uri: str
    fenced_delete = False  # whether delete(if_match=) is known to be honoured (see ``delete``)

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, content_type: str | None = None,
        metadata: dict[str, str] | None = None, if_absent: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write ``data`` (and its user ``metadata``, atomically with it) at ``key``; returns the
        new version's etag. ``if_absent``: only if the key is free, else AlreadyExists.
        ``if_match``: only if the stored version is that etag, else VersionChanged. Either way a
        write that fails its condition changes nothing, however late it lands."""

    @abstractmethod
    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Read ``key``; NotFound if missing, TooLarge past ``max_bytes`` (checked while reading)."""

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``start`` (fewer at its end); NotFound if missing.
        Large tables are read a few columns at a time through this (``tables.open_table``).
        This default reads the whole object: the implementations read only the range."""
        return self.get(key)[start:start + length]

    @abstractmethod
    def get_versioned(self, key: str, max_bytes: int | None = None) -> Versioned:
        """Read ``key`` with its etag (what a later ``if_match`` names); errors as ``get``."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, user metadata and etag of ``key``, or None."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def delete(self, key: str, if_match: str | None = None) -> None:
        """Remove ``key`` if present. ``if_match`` asks the server to delete only that version:
        honoured locally, by AWS and moto, IGNORED by Ceph RGW; so never rely on it for safety
        (fence with a conditional ``put`` instead), use it only to narrow a window."""

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Copy ``key`` into the local file ``dest``, streamed (never whole in memory);
        NotFound if missing. ``dest`` may be left partial on failure: write beside, then rename."""

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Write the local file ``path`` at ``key`` whole, unconditionally: a reader sees the old
        object or the new one, never part of it. For large objects (an export's shards):
        implementations stream it (local: copied beside and renamed; S3: a multipart upload for
        large files). This default reads the file into memory and ``put``s it."""
        self.put(key, path.read_bytes(), content_type=content_type)

    def reserve(self) -> None:
        """Set aside room for the writes a run must make even when its storage is full (the
        lease's release): local outputs keep a small reserve file, spent on the first write
        that finds the disk full. S3 needs none."""
        return None

    def sweep(self) -> int:
        """Remove what writers killed mid-write left behind (local temporaries); how many.
        Only while no one else writes (under the output's lease). S3 leaves nothing."""
        return 0

    def url_of(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"



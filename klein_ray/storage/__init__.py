"""Storage: objects under a root URI, on local disk or any S3-compatible server.

Imports run downward only: this module (``open_store``) picks an implementation; ``local`` and
``s3`` implement ``base``; ``base`` (the interface, its errors, URI helpers) imports neither.
Every S3 call of the project goes through a ``Store``, so retries and error translation are one.
"""

from __future__ import annotations

from klein_ray.config import ConfigError, StorageConfig
from klein_ray.storage.base import (
    AlreadyExists,
    ConditionFailed,
    Misconfigured,
    NotFound,
    ObjectInfo,
    StorageError,
    Store,
    TooLarge,
    VersionChanged,
    Versioned,
    check_key,
)
from klein_ray.storage.local import LocalStore, file_sha256
from klein_ray.uris import FILE, S3, UriError, parse

__all__ = [
    "AlreadyExists",
    "ConditionFailed",
    "LocalStore",
    "Misconfigured",
    "NotFound",
    "ObjectInfo",
    "StorageError",
    "Store",
    "TooLarge",
    "VersionChanged",
    "Versioned",
    "check_key",
    "file_destination",
    "file_sha256",
    "open_store",
    "reset_clients",
]


def open_store(uri: str, cfg: StorageConfig | None = None) -> Store:
    """The store rooted at ``uri``: S3 for ``s3://``, a local directory for a path or
    ``file://`` URI (``klein_ray.uris``); UriError (a ValueError) for anything else."""
    where = parse(uri, accept=(S3, FILE))
    if where.kind == S3:
        from klein_ray.storage.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(where.uri, cfg or StorageConfig())
    return LocalStore(where.path or uri)


def file_destination(uri: str, what: str, example: str) -> tuple[str, str]:
    """Where one named file goes: (the store's root URI, the key), for a local path or an
    ``s3://bucket/key``. ConfigError naming ``what`` for a directory, a bucket without a key or
    another scheme (``example``: a file name to suggest)."""
    try:
        where = parse(uri, accept=(S3, FILE), what=what)
    except UriError as exc:
        raise ConfigError(str(exc)) from None
    if where.kind == S3:
        root, _, key = where.uri.rpartition("/")
        if not where.key or root == "s3:/" or uri.endswith("/"):
            raise ConfigError(f"{what} {uri}: expected s3://bucket/{example}")
        return root, key
    assert where.path is not None
    if where.path.is_dir() or uri.endswith("/"):
        raise ConfigError(f"{what} {uri}: a directory; name the file (e.g. {example})")
    return str(where.path.parent), where.path.name


def reset_clients() -> None:
    """Forget the process's shared S3 clients (see ``klein_ray.storage.s3.reset_clients``)."""
    from klein_ray.storage.s3 import reset_clients as reset

    reset()

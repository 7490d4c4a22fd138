"""Storage: objects under a root URI, on local disk or any S3-compatible server.

Imports run downward only: this module (``open_store``) picks an implementation; ``local`` and
``s3`` implement ``base``; ``base`` (the interface, its errors, URI helpers) imports neither.
Every S3 call of the project goes through a ``Store``, so retries and error translation are one.
"""

from __future__ import annotations

from klein_ray.config import StorageConfig
from klein_ray.storage.base import (
    AlreadyExists,
    ConditionFailed,
    NotFound,
    ObjectInfo,
    Store,
    StorageError,
    TooLarge,
    VersionChanged,
    Versioned,
    check_key,
    is_s3,
    local_path,
    split_s3,
)
from klein_ray.storage.local import LocalStore

__all__ = [
    "AlreadyExists", "ConditionFailed", "LocalStore", "NotFound", "ObjectInfo", "Store",
    "StorageError", "TooLarge", "VersionChanged", "Versioned",
    "check_key", "is_s3", "local_path", "open_store", "reset_clients", "split_s3",
]


def open_store(uri: str, cfg: StorageConfig | None = None) -> Store:
    """The store rooted at ``uri``: S3 for ``s3://``, a local directory otherwise."""
    if is_s3(uri):
        from klein_ray.storage.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(uri, cfg or StorageConfig())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI scheme: {uri!r} (use s3://, file:// or a path)")
    return LocalStore(uri)


def reset_clients() -> None:
    """Forget the process's shared S3 clients (see ``klein_ray.storage.s3.reset_clients``)."""
    from klein_ray.storage.s3 import reset_clients as reset

    reset()

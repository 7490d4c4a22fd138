"""The compile cache: PyTorch's portable compile artifacts, kept where the next actor finds them.

Owns reading and writing ``<key>.bin`` under ``run.compile_cache`` (a local directory or an
s3:// prefix; unset: ``<cache_dir>/compile`` on each node). The model layer makes and consumes
the bytes (``KleinModel.compile_artifacts``, ``load_compile_artifacts``) and does no I/O.

A cache must never cost a render: every failure to read or write is logged (without the URI's
secrets) and treated as a miss. Entries are written whole (a store's put is atomic) and only
when absent; two actors that compile the same key at once write equivalent entries, and either
one serves (inductor checks each graph's own hash when it loads one).
"""

from __future__ import annotations

import logging
import os

from klein_ray.config import JobConfig
from klein_ray.storage import AlreadyExists, NotFound, StorageError, Store, open_store

log = logging.getLogger(__name__)
MAX_BYTES = 4 << 30  # compile artifacts of a 9B are tens of MB; anything this large is not ours


def cache_uri(cfg: JobConfig) -> str:
    return cfg.run.compile_cache or os.path.join(os.path.expanduser(cfg.run.cache_dir), "compile")


class CompileCache:
    def __init__(self, cfg: JobConfig):
        self.uri = cache_uri(cfg)
        self._storage = cfg.storage
        self._store: Store | None = None

    def _open(self) -> Store:
        if self._store is None:
            self._store = open_store(self.uri, self._storage)
        return self._store

    def read(self, key: str) -> bytes | None:
        """The entry for ``key``, or None (absent, or unreadable: logged)."""
        try:
            return self._open().get(f"{key}.bin", max_bytes=MAX_BYTES)
        except NotFound:
            return None
        except (StorageError, OSError, ValueError) as exc:
            log.warning("compile cache: cannot read %s (%s); compiling instead", key, type(exc).__name__)
            return None

    def write(self, key: str, data: bytes) -> bool:
        """Keep ``data`` for ``key`` unless an entry is there already; True if written."""
        try:
            self._open().put(f"{key}.bin", data, content_type="application/octet-stream", if_absent=True)
            return True
        except AlreadyExists:
            return False
        except (StorageError, OSError, ValueError) as exc:
            log.warning("compile cache: cannot write %s (%s)", key, type(exc).__name__)
            return False

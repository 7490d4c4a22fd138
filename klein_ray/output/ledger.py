"""The ledger: the only place that decides a row is done, and the commit protocol that makes it so.

A row is done exactly when ``meta/{id}.json`` exists and names an image whose sha256 matches.
Commit order: the image first (overwriting any uncommitted leftover of an earlier attempt, with
its sha256 in the object's metadata), then the metadata marker last with a conditional create.
If the marker already exists (a retried write that had landed, or another writer), it is read
back: the same image sha256 means our own earlier attempt; anything else is a conflict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from klein_ray.output import layout
from klein_ray.output.checkpoint import Checkpoint, DoneSet
from klein_ray.output.layout import image_key, meta_key
from klein_ray.storage import AlreadyExists, NotFound, Store
from klein_ray.types import RowResult


class CommitConflict(Exception):
    """The row was committed by someone else with a different image."""


@dataclass(frozen=True)
class Receipt:
    image_key: str
    meta_key: str
    sha256: str
    bytes: int
    already: bool = False  # the row was committed by another attempt; this one wrote nothing final


class Ledger:
    def __init__(self, store: Store, run_id: str = ""):
        self.store = store
        self.checkpoint = Checkpoint(store, run_id)

    # -- deciding ----------------------------------------------------------------------

    def done(self) -> DoneSet:
        """Rows known committed, from the compact checkpoint (a few requests, not a listing)."""
        return self.checkpoint.load()

    def record(self, result: RowResult) -> None:
        """Add a committed row to the checkpoint (flushed in parts)."""
        self.checkpoint.record(result)

    def is_fresh(self) -> bool:
        """No marker at all under OUT (one listing request): workers can skip marker checks."""
        return next(iter(self.store.list(layout.META)), None) is None

    def existing(self, row_id: str) -> dict[str, Any] | None:
        """The row's marker if it exists already (committed by an earlier attempt)."""
        return self.read_meta(row_id)

    def committed_ids(self) -> set[str]:
        """Ids whose marker exists, by listing every marker (exact, ~1 request per 1,000 rows)."""
        ids = (layout.id_of_meta_key(obj.key) for obj in self.store.list(layout.META))
        return {row_id for row_id in ids if row_id is not None}

    def read_meta(self, row_id: str) -> dict[str, Any] | None:
        """The row's marker, or None if absent or unreadable (a damaged marker commits nothing)."""
        try:
            meta = json.loads(self.store.get(meta_key(row_id)))
        except (NotFound, ValueError):
            return None
        image = meta.get("image") if isinstance(meta, dict) else None
        if not isinstance(image, dict) or not {"key", "sha256", "bytes"} <= image.keys():
            return None
        return meta

    def verify(self, row_id: str) -> bool:
        """The full check: marker present, and its image present with the sha256 it names."""
        meta = self.read_meta(row_id)
        if not meta:
            return False
        try:
            data = self.store.get(meta["image"]["key"])
        except (NotFound, ValueError):
            return False
        return hashlib.sha256(data).hexdigest() == meta["image"]["sha256"]

    # -- committing --------------------------------------------------------------------

    def commit(self, row_id: str, fmt: str, image: bytes, content_type: str,
               meta: dict[str, Any]) -> Receipt:
        """Write the image, then the marker; returns what was committed."""
        sha = hashlib.sha256(image).hexdigest()
        receipt = Receipt(image_key(row_id, fmt), meta_key(row_id), sha, len(image))
        self.store.put(receipt.image_key, image, content_type=content_type, metadata={"sha256": sha})
        record = dict(meta)
        record["image"] = {"key": receipt.image_key, "sha256": sha, "bytes": len(image),
                           "content_type": content_type}
        # allow_nan=False: a NaN would make the marker invalid JSON, and so the row never done.
        body = json.dumps(record, sort_keys=True, indent=1, default=str, allow_nan=False).encode()
        try:
            self.store.put(receipt.meta_key, body, content_type="application/json", if_absent=True)
        except AlreadyExists:
            return self._resolve(row_id, receipt, body)
        return receipt

    def _resolve(self, row_id: str, ours: Receipt, body: bytes) -> Receipt:
        """The marker exists: decide from stored sha256s, never by guessing.

        - it names our image: our earlier attempt landed (a retried write whose reply was lost);
        - it names the image now stored: another attempt committed consistently; keep theirs;
        - the stored image is ours (we overwrote theirs after they committed): make the marker
          name what is stored, so the row stays consistent;
        - anything else is someone else's write in progress: a conflict (the caller retries).
        """
        existing = self.read_meta(row_id) or {}
        named = existing.get("image", {}).get("sha256")
        if named == ours.sha256:
            return ours
        head = self.store.head(ours.image_key)
        stored = (head.metadata or {}).get("sha256") if head else None
        if stored is not None and stored == named:
            image = existing["image"]
            return Receipt(image["key"], ours.meta_key, image["sha256"], image["bytes"], already=True)
        if stored == ours.sha256:
            self.store.put(ours.meta_key, body, content_type="application/json")
            old_key = existing.get("image", {}).get("key")
            if old_key and old_key != ours.image_key:
                self.store.delete(old_key)  # one image per id, even across a change of format
            return ours
        raise CommitConflict(f"{ours.meta_key} names an image another writer is replacing; retry")

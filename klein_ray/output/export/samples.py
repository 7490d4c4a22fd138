"""One exported sample: its key, its image, its caption and its metadata, the same fields in
every sample of every format.

The key is the row's manifest position, zero-padded (``0000001234``): dot-free (webdataset
splits a sample's key from its extensions at the first dot, and row ids may contain dots),
unique within the export, and in the order the rows are written, so the tar's members are
sorted. The row id is kept in the metadata. The metadata comes from the row's commit marker,
the very version the ledger judged: what the image was rendered from, so image and caption
always agree (a row edited in the manifest since is exported as rendered, status ``stale``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from klein_ray.output.markers import CommittedRow
from klein_ray.types import IMAGE_EXTENSIONS

# The metadata's keys, in every sample (``.json`` of a webdataset sample; Parquet columns).
SAMPLE_FIELDS = ("key", "id", "prompt", "seed", "width", "height", "variant", "format", "sha256", "passthrough")
FORMAT_OF_EXTENSION = {ext: fmt for fmt, ext in IMAGE_EXTENSIONS.items()}
TAR_MEMBER_OVERHEAD = 3 * 1024  # three members, each a 512-byte header and up to 511 of padding


@dataclass(frozen=True)
class Sample:
    """A committed row ready to be written (its image is read from OUT while writing)."""

    key: str
    ext: str  # the image's extension: png | jpg | webp
    image_key: str  # in OUT
    sha256: str  # the committed image's
    image_bytes: int
    meta: dict[str, Any]  # SAMPLE_FIELDS

    @property
    def id(self) -> str:
        return str(self.meta["id"])

    @property
    def caption(self) -> bytes:
        return str(self.meta["prompt"]).encode()

    def json_bytes(self) -> bytes:
        return metadata_json(self.meta)

    def size(self) -> int:
        """What it adds to a shard, about (the part rule's measure): image, caption, metadata
        and the tar's headers."""
        return self.image_bytes + len(self.caption) + len(self.json_bytes()) + TAR_MEMBER_OVERHEAD


def sample_key(position: int) -> str:
    return f"{position:010d}"


def sample_of(position: int, record: CommittedRow, marker: dict[str, Any]) -> Sample:
    """The sample of a committed row from the marker the ledger judged."""
    ext = record.image_key.rsplit(".", 1)[-1]
    passthrough = marker.get("passthrough")
    meta = {
        "key": sample_key(position),
        "id": record.id,
        "prompt": _text(marker.get("prompt")),
        "seed": _int(marker.get("seed")),
        "width": _int(marker.get("width")),
        "height": _int(marker.get("height")),
        "variant": _text(marker.get("variant")),
        "format": FORMAT_OF_EXTENSION.get(ext, ext),
        "sha256": record.sha256,
        "passthrough": passthrough if isinstance(passthrough, dict) else {},
    }
    return Sample(sample_key(position), ext, record.image_key, record.sha256, record.bytes, meta)


def metadata_json(meta: dict[str, Any]) -> bytes:
    """The ``.json`` member: canonical (sorted keys, compact, UTF-8), so equal rows give equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def metadata_digest(sample: Sample) -> str:
    return hashlib.sha256(sample.json_bytes()).hexdigest()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

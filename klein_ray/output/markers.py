"""What a commit marker is, and the one predicate that says whether it commits its row.

A marker (``meta/{id}.json``) commits the row ``id`` exactly when it is readable JSON naming an
image we could have written (a key under ``images/``, a sha256, a size), its ``id`` is the row's,
the image key is the row's own (``images/{id}.{ext}``), and that image is stored with the size
and sha256 the marker names (shallow: the sha256 the image carries in its own metadata; deep:
its bytes hashed). ``commit_problem`` is that predicate, pure: the ledger reads the store and
asks it; every caller (the worker's skip check, resume, ``status``, ``verify``, ``render
--verify``, exporters) goes through the ledger. Also here: the records a judgement returns, and
the epoch a marker or an image was written in (a writer never replaces what a newer epoch wrote).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from klein_ray.output import layout
from klein_ray.output.layout import image_key
from klein_ray.storage import ObjectInfo, check_key
from klein_ray.types import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class CommittedRow:
    """A committed row's record: where its marker and image are, and the image's identity."""

    id: str
    image_key: str
    sha256: str
    bytes: int
    meta_key: str
    marker_version: str = ""  # the marker's etag when judged ('' from the checkpoint)
    inputs: str | None = None  # the manifest row digest it was rendered from (None: unrecorded)
    setup: str | None = None  # the variant setup it was rendered under (None: unrecorded)


@dataclass(frozen=True)
class Verdict:
    """Why a row is not committed, and the version of its marker that was judged ('' if there
    is none): a repair replaces the row only while the marker is still that version."""

    id: str
    problem: str
    marker_version: str = ""
    present: bool = True  # a marker object exists (readable or not)


def own_image_keys(row_id: str) -> set[str]:
    """The keys a row's image may have: ``images/{id}.{ext}`` for each output format."""
    return {image_key(row_id, fmt) for fmt in IMAGE_EXTENSIONS}


def identity_problem(row_id: str, marker: dict[str, Any]) -> str | None:
    """Whether a (parsed) marker is the row's own: its id, and an image key of the row's."""
    named = marker.get("id")
    if named != row_id:
        return f"the marker is row {named!r}'s, not this row's" if isinstance(named, str) else \
            "the marker names no row id"
    if marker["image"]["key"] not in own_image_keys(row_id):
        return f"the marker names {marker['image']['key']}, which is not this row's image"
    return None


def commit_problem(row_id: str, marker: dict[str, Any] | None, image: ObjectInfo | None,
                   data: bytes | None = None) -> str | None:
    """THE predicate: why ``marker`` (parsed; None if absent or unreadable) does not commit the
    row ``row_id`` given what is stored at the image key it names (``image``, None if nothing;
    ``data``: the image's bytes when checking deep), or None when it does."""
    if marker is None:
        return "no readable marker naming an image (key, sha256, bytes)"
    problem = identity_problem(row_id, marker)
    if problem is not None:
        return problem
    named = marker["image"]
    if image is None:
        return f"{named['key']} is missing"
    if image.size != named["bytes"]:
        return f"{named['key']} is {image.size} bytes, the marker says {named['bytes']}"
    sha = sha_of(image)
    if sha is None:
        return f"{named['key']} carries no sha256 of its own (written by another tool?)"
    if sha != named["sha256"]:
        return f"{named['key']} is another image than the one the marker names (sha256 differs)"
    if data is not None and hashlib.sha256(data).hexdigest() != named["sha256"]:
        return f"{named['key']}: its bytes do not hash to the sha256 the marker names"
    return None


def parse_marker(raw: bytes) -> dict[str, Any] | None:
    """The marker if it is JSON naming an image we could have written (a key under images/, a
    sha256, a size), else None: such a marker commits nothing."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    image = meta.get("image") if isinstance(meta, dict) else None
    if not isinstance(image, dict) or not {"key", "sha256", "bytes"} <= image.keys():
        return None
    key, sha, size = image["key"], image["sha256"], image["bytes"]
    if not (isinstance(key, str) and key.startswith(layout.IMAGES) and _safe(key)):
        return None
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return meta


def _safe(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def sha_of(info: ObjectInfo) -> str | None:
    return info.content_sha256 or (info.metadata or {}).get("sha256")


def epoch_of(data: bytes | dict[str, Any] | None) -> int:
    """The epoch a marker (raw or parsed; a repair placeholder too) was written in; 0 if none."""
    if isinstance(data, bytes):
        try:
            data = json.loads(data)
        except ValueError:
            return 0
    value = data.get("epoch") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def image_epoch(info: ObjectInfo) -> int:
    """The epoch an image was written in (its metadata), 0 if it carries none."""
    value = (info.metadata or {}).get("epoch", "")
    return int(value) if value.isdigit() else 0

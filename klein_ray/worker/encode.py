"""Image encoding: a rendered PIL image to png / jpeg / webp bytes with the job's quality
settings, and the small JPEG thumbnails the contact sheet shows (of the image, and of the
references it was made from)."""

from __future__ import annotations

import io
import threading
from typing import Any

from PIL import Image

from klein_ray.config import OutputConfig


def encode_image(image, fmt: str, cfg: OutputConfig) -> bytes:
    """Encode ``image`` (RGB); deterministic for the same pixels and settings."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=cfg.png_compress_level)
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0 if cfg.jpeg_quality >= 90 else 2)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=cfg.webp_quality, lossless=cfg.webp_lossless, method=4)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def make_thumbnail(image: Image.Image, max_side: int = 192) -> bytes:
    """A small RGB JPEG of ``image``, longest side at most ``max_side``, aspect preserved."""
    thumb = image.copy()
    # JPEG has no alpha or palette: flatten onto white so transparent areas don't turn black.
    if thumb.mode in ("RGBA", "LA") or (thumb.mode == "P" and "transparency" in thumb.info):
        rgba = thumb.convert("RGBA")
        thumb = Image.new("RGB", rgba.size, (255, 255, 255))
        thumb.paste(rgba, mask=rgba.getchannel("A"))
    elif thumb.mode != "RGB":
        thumb = thumb.convert("RGB")
    thumb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=80, optimize=True)
    return out.getvalue()


REFERENCE_THUMB_SIDE = 96  # reference thumbnails sit beside the image's, smaller


class ReferenceThumbnails:
    """Each reference's small JPEG, made once per reference content (sha256) and kept for the
    next units (a catalog uses one product photo for all its scenes and seeds); at most
    ``keep`` of them, the oldest forgotten first."""

    def __init__(self, max_side: int = REFERENCE_THUMB_SIDE, keep: int = 256):
        self.max_side, self.keep = max_side, keep
        self._made: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def of(self, refs: list[Any]) -> tuple[tuple[str, bytes], ...]:
        """(sha256, JPEG) per reference (``assets.references.Reference``: sha256 and image)."""
        return tuple((ref.sha256, self._one(ref)) for ref in refs)

    def _one(self, ref: Any) -> bytes:
        with self._lock:
            found = self._made.get(ref.sha256)
        if found is not None:
            return found
        thumb = make_thumbnail(ref.image, max_side=self.max_side)
        with self._lock:
            if len(self._made) >= self.keep:
                self._made.pop(next(iter(self._made)))
            self._made[ref.sha256] = thumb
        return thumb

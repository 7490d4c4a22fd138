"""Image encoding: ``output.png_compress_level`` reaches zlib (the level each PNG's zlib header
declares), changes the size and never the pixels, and is part of a render's fingerprint (another
level writes other bytes, so an image left at another level must not stand for this row)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from klein_ray.config import JobConfig, OutputConfig
from klein_ray.output import record
from klein_ray.worker.encode import encode_image

# zlib's FLEVEL (two bits of the stream header's FLG byte) for each compression level.
FLEVEL = {0: 0, 1: 0, 2: 1, 5: 1, 6: 2, 7: 3, 9: 3}


def _photo_like(size: int = 192) -> Image.Image:
    """A smooth gradient with grain: compressible, unlike the tiny model's noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([200 - 80 * y, 120 + 60 * x, 90 + 40 * x * y], -1) + rng.normal(0, 2, (size, size, 3))
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _zlib_flevel(png: bytes) -> int:
    """FLEVEL of the zlib stream in the PNG's first IDAT chunk."""
    pos = 8  # after the PNG signature
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            cmf, flg = png[pos + 8], png[pos + 9]
            assert cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0  # deflate, a valid header
            return flg >> 6
        pos += 12 + length
    raise AssertionError("no IDAT chunk")


@pytest.mark.parametrize("level", sorted(FLEVEL))
def test_the_png_level_reaches_zlib_and_the_pixels_are_kept(level):
    image = _photo_like()
    data = encode_image(image, "png", OutputConfig(png_compress_level=level))
    assert _zlib_flevel(data) == FLEVEL[level]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_levels_trade_size_on_the_same_image():
    image = _photo_like()
    size = {level: len(encode_image(image, "png", OutputConfig(png_compress_level=level)))
            for level in (0, 1, 9)}
    assert size[0] > size[1] > size[9]  # stored > fastest > smallest


def test_the_default_level_is_what_the_encoder_uses_without_a_setting():
    image = _photo_like()
    default = OutputConfig().png_compress_level
    assert encode_image(image, "png", OutputConfig()) == \
        encode_image(image, "png", OutputConfig(png_compress_level=default))
    assert _zlib_flevel(encode_image(image, "png", OutputConfig())) == FLEVEL[default]


def test_the_png_level_is_part_of_the_render_fingerprint():
    meta = {"id": "r1", "prompt": "a vase", "variant": "tiny", "width": 64, "height": 64, "steps": 4,
            "guidance": None, "seed": 7, "format": "png", "references": [],
            "model": {"source": "/m", "pipeline": "Flux2KleinPipeline", "dtype": "float32"}}

    def fingerprint(level: int) -> str:
        return record.fingerprint(meta, JobConfig(output=OutputConfig(png_compress_level=level)))

    assert fingerprint(1) == fingerprint(1)
    assert fingerprint(1) != fingerprint(6)

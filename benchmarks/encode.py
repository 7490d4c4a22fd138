#!/usr/bin/env python
"""PNG compression level: encode time and size of realistic 1024² images, level by level.

    .venv/bin/python benchmarks/encode.py [--size 1024] [--levels 0,1,3,6,9] [--repeats 5]

The tiny model renders noise, which no compressor can shrink, so its output says nothing about
PNG levels. These images are synthesised deterministically (numpy, fixed seeds) to have the
statistics of photographs instead:

  studio  a catalog product shot: a smooth backdrop gradient, a soft shadow, a product with hard
          anti-aliased edges and a 1/f texture on it, fine grain (sigma 1.5 levels);
  scene   a natural scene: 1/f ("pink", amplitude ~ 1/f) luminance and chroma fields, the
          spectrum of natural images, over a sky-to-ground gradient, grain (sigma 2.5 levels).

Each image is encoded the way the worker encodes (``klein_ray.worker.encode.encode_image`` with
``output.png_compress_level`` set), ``--repeats`` times per level on one thread; the median time,
the size, bits per pixel and the ratios against level 6 (Pillow's and zlib's default) are printed,
and every level's PNG is decoded and checked to hold the same pixels (PNG is lossless at every
level: only speed and size change). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from PIL import Image, features

from klein_ray.config import OutputConfig
from klein_ray.worker.encode import encode_image


def pink_field(rng: np.random.Generator, size: int, alpha: float = 1.0) -> np.ndarray:
    """Random-phase noise whose amplitude falls as 1/f**alpha, scaled to [-1, 1]."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return field / np.abs(field).max()


def studio(size: int) -> Image.Image:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:size, 0:size] / size
    backdrop = np.stack([0.92 - 0.12 * y, 0.90 - 0.10 * y, 0.88 - 0.06 * y], -1)  # a sweep, lit from above
    shadow = np.exp(-(((x - 0.5) / 0.28) ** 2 + ((y - 0.80) / 0.05) ** 2))[..., None]
    img = backdrop * (1 - 0.35 * shadow)
    # The product: a rounded box, anti-aliased edge, its own colour, texture and shading.
    d = np.maximum(np.abs(x - 0.5) - 0.22, 0) ** 2 + np.maximum(np.abs(y - 0.52) - 0.26, 0) ** 2
    edge = np.clip((0.04 - np.sqrt(d)) * size / 1.5, 0, 1)[..., None]
    texture = pink_field(rng, size, 1.2)[..., None]
    product = np.array([0.62, 0.16, 0.12]) * (0.75 + 0.35 * (1 - y[..., None]) + 0.10 * texture)
    img = img * (1 - edge) + product * edge
    img = img * 255 + rng.normal(0, 1.5, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def scene(size: int) -> Image.Image:
    rng = np.random.default_rng(2)
    y = np.mgrid[0:size, 0:size][0] / size
    luma = 0.5 + 0.28 * pink_field(rng, size) - 0.15 * (y - 0.5)
    chroma = [0.06 * pink_field(rng, size, 1.4) for _ in range(2)]
    tint = np.stack([0.05 - 0.10 * y, 0.02 * np.ones_like(y), 0.10 - 0.20 * y], -1)  # sky to ground
    img = np.stack([luma + chroma[0], luma - 0.5 * chroma[0] - 0.5 * chroma[1], luma + chroma[1]], -1) + tint
    img = img * 255 + rng.normal(0, 2.5, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def measure(image: Image.Image, level: int, repeats: int) -> dict:
    cfg = OutputConfig(png_compress_level=level)
    data, times = b"", []
    for _ in range(repeats):
        t0 = time.perf_counter()
        data = encode_image(image, "png", cfg)
        times.append(time.perf_counter() - t0)
    same = np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))
    return {"ms": statistics.median(times) * 1000, "bytes": len(data),
            "bpp": len(data) * 8 / (image.width * image.height), "lossless": same}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--levels", default="0,1,3,6,9", help="comma-separated PNG levels (6 is always measured)")
    p.add_argument("--repeats", type=int, default=5, help="encodes per (image, level); the median is printed")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    levels = sorted({int(v) for v in args.levels.split(",")} | {6})
    zlib = "zlib-ng " + features.version("zlib_ng") if features.check_feature("zlib_ng") else \
        "zlib " + str(features.version("zlib"))
    print(f"# PNG levels, {args.size}x{args.size} RGB, median of {args.repeats}, one thread; Pillow "
          f"{Image.__version__} ({zlib}); {platform.node()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, {datetime.date.today()}")
    results = {}
    for name, make in (("studio", studio), ("scene", scene)):
        image = make(args.size)
        rows = {level: measure(image, level, args.repeats) for level in levels}
        results[name] = rows
        base = rows[6]
        print(f"\n{name}:\n| level | ms | MB | bits/pixel | time vs 6 | size vs 6 | pixels identical |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for level, r in rows.items():
            print(f"| {level} | {r['ms']:.0f} | {r['bytes'] / 1e6:.2f} | {r['bpp']:.2f} | "
                  f"{r['ms'] / base['ms']:.2f}x | {r['bytes'] / base['bytes']:.2f}x | {r['lossless']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["lossless"] for rows in results.values() for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

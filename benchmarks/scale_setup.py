"""The state ``benchmarks/scale.py`` measures: a manifest of N rows and the OUT a killed job
leaves when 99% of it is committed, written vectorised with Arrow (no Python object per row).

The manifest is N rows in files of ``FILE_ROWS`` (row groups of 65,536), ids ``row-000000001``.
The checkpoint is written straight in the checkpoint's schema (``klein_ray.output.parts.MERGED``,
through ``storage.tables.TableWriter``, as a merge writes it): one whole-output part of the first
98% (epoch 1, what the previous run's end-of-run merge left) and, for the next 1%, the parts an
LSM-merging run killed midway leaves (epoch 2: levels of 160,000 and 10,000 rows). Every record
names its row's origin (file, the file's sha256, position, setup group) and the setup digest the
benchmark's config gives, as ``Checkpoint.record`` would. ``_job/scan.parquet`` is what the killed
run's prescan kept. Random sha256 per image (64 hex characters: they do not compress).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILE_ROWS = 1_000_000
MANIFEST_ROW_GROUP = 65536
PROMPT = b"a watercolour lighthouse at dusk, study "
RUN_WHOLE, RUN_KILLED = "20261201T000000Z-aaaaaa", "20261202T000000Z-bbbbbb"


def fixed_strings(prefix: bytes, numbers: np.ndarray, digits: int, suffix: bytes = b"") -> pa.Array:
    """``prefix + zero-padded number + suffix`` for each number, built as one byte matrix."""
    n, width = len(numbers), len(prefix) + digits + len(suffix)
    buf = np.empty((n, width), np.uint8)
    buf[:, :len(prefix)] = np.frombuffer(prefix, np.uint8)
    x = numbers.astype(np.int64).copy()
    for d in range(digits - 1, -1, -1):
        buf[:, len(prefix) + d] = 48 + x % 10
        x //= 10
    if suffix:
        buf[:, len(prefix) + digits:] = np.frombuffer(suffix, np.uint8)
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def random_hex(n: int, nbytes: int) -> pa.Array:
    raw = np.frombuffer(os.urandom(n * nbytes), np.uint8).reshape(n, nbytes)
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    out = np.empty((n, 2 * nbytes), np.uint8)
    out[:, 0::2], out[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = np.arange(0, (n + 1) * 2 * nbytes, 2 * nbytes, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


def row_ids(lo: int, hi: int) -> pa.Array:
    return fixed_strings(b"row-", np.arange(lo + 1, hi + 1), 9)


def write_manifest(root: Path, rows: int) -> list[tuple[str, str, int, int]]:
    """The manifest's files: (relative name, sha256, first row, rows) each."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k, lo in enumerate(range(0, rows, FILE_ROWS)):
        hi = min(rows, lo + FILE_ROWS)
        n = np.arange(lo + 1, hi + 1)
        table = pa.table({
            "id": row_ids(lo, hi), "prompt": fixed_strings(PROMPT, n, 9),
            "width": pa.array(np.full(hi - lo, 512, np.int32)), "height": pa.array(np.full(hi - lo, 512, np.int32)),
        })
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, root / name, row_group_size=MANIFEST_ROW_GROUP)
        digest = hashlib.sha256()
        with open(root / name, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        files.append((name, digest.hexdigest(), lo, hi - lo))
    return files


def records(files, lo: int, hi: int, epoch: int, run_id: str, setup: str, group: str) -> pa.Table:
    """The checkpoint records of manifest rows ``lo .. hi`` (global positions)."""
    from klein_ray.output.parts import SCHEMA

    n = hi - lo
    numbers = np.arange(lo + 1, hi + 1)
    file_index = np.searchsorted(np.array([f[2] for f in files]), np.arange(lo, hi), side="right") - 1
    names = pa.DictionaryArray.from_arrays(pa.array(file_index.astype(np.int32)), pa.array([f[0] for f in files]))
    tags = pa.DictionaryArray.from_arrays(pa.array(file_index.astype(np.int32)), pa.array([f[1] for f in files]))
    starts = np.array([f[2] for f in files])[file_index]
    const = lambda value, kind=pa.string(): pa.array([value] * 1, kind).take(pa.array(np.zeros(n, np.int32)))
    return pa.table({
        "id": row_ids(lo, hi), "variant": const("tiny"),
        "image_key": fixed_strings(b"images/row-", numbers, 9, b".png"),
        "meta_key": fixed_strings(b"meta/row-", numbers, 9, b".json"),
        "sha256": random_hex(n, 32), "bytes": pa.array(400_000 + numbers % 5000),
        "width": pa.array(np.full(n, 512, np.int32)), "height": pa.array(np.full(n, 512, np.int32)),
        "seed": pa.array(numbers * 7919), "render_s": pa.array(1.0 + (numbers % 97) / 100),
        "worker": const("node-1:4242"), "run_id": const(run_id), "inputs": random_hex(n, 8),
        "setup": const(setup), "epoch": pa.array(np.full(n, epoch, np.int64)),
        "file": names.cast(pa.string()), "tag": tags.cast(pa.string()),
        "row": pa.array(np.arange(lo, hi) - starts), "group": const(group),
    }, schema=SCHEMA)


def write_checkpoint(store, files, rows: int, done: float, setup: str, group: str, log) -> dict:
    """The parts a killed run leaves (see the module docstring); their count and bytes."""
    from klein_ray.output import layout
    from klein_ray.output.parts import MERGED, ROW_GROUP_ROWS, _dictionaries
    from klein_ray.storage.tables import TableWriter

    whole, end = int(rows * (done - 0.01)), int(rows * done)
    t = time.perf_counter()
    with TableWriter(store, layout.results_part(RUN_WHOLE, 99, 0), MERGED, ROW_GROUP_ROWS) as writer:
        for lo in range(0, whole, ROW_GROUP_ROWS):
            writer.write(_dictionaries(records(files, lo, min(whole, lo + ROW_GROUP_ROWS), 1, RUN_WHOLE, setup, group)))
    log(f"    whole part: {whole:,} records ({time.perf_counter() - t:.0f} s)")
    seq, lo = 0, whole
    for level, size in ((1, 160_000), (0, 10_000)):
        while end - lo >= size or (level == 0 and lo < end):
            hi = min(end, lo + size)
            with TableWriter(store, layout.results_part(RUN_KILLED, level, seq), MERGED, ROW_GROUP_ROWS) as writer:
                writer.write(_dictionaries(records(files, lo, hi, 2, RUN_KILLED, setup, group)))
            seq, lo = seq + 1, hi
    listed = list(store.list(layout.RESULTS))
    return {"parts": len(listed), "checkpoint_mb": sum(o.size for o in listed) / 2**20, "done": end}

"""Hash-partitioned spills of Arrow record batches to local disk, and the string hash they use.

Joining or grouping two streams by a string key (ids) without holding either in memory: every
batch is split by a hash of its key into ``partitions`` parts, appended to one Arrow IPC file
per part under a private temporary directory, and each part is then read back alone (all the
rows of one key land in one part). The hash only balances the parts: whoever reads a part
compares the keys themselves (Arrow's joins and group-bys on the strings), so two keys that
share a hash cost a little balance, never exactness. A spill expected to stay small keeps its
batches in memory instead (one part, no files).

``string_hashes`` hashes an Arrow string array in numpy, eight bytes of every string at a time,
without making a Python object of any string.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

PARTITION_ROWS = 500_000  # rows per part a spill aims at (one part is read whole)
MEMORY_ROWS = 500_000  # a spill expected to hold at most this many rows stays in memory
HASH_BYTES = 128  # bytes hashed at each end of a longer string (ids are at most 128 characters)

_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def string_hashes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string (uint64; 0 for a null), from its bytes and length: the
    first and last ``HASH_BYTES`` bytes of longer strings. Vectorised over 8-byte words."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_null(values.type):
        return np.zeros(len(values), np.uint64)
    if not (pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)):
        values = values.cast(pa.large_binary() if pa.types.is_binary(values.type) else pa.large_string())
    n = len(values)
    _, off_buf, data_buf = values.buffers()
    offsets = np.frombuffer(off_buf, np.int64, n + 1, values.offset * 8) if n else np.zeros(1, np.int64)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None and data_buf.size else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
    padded = np.zeros(len(data) + 16, np.uint8)
    padded[:len(data)] = data
    windows = np.lib.stride_tricks.as_strided(padded, (len(padded) - 7, 8), (1, 1))
    with np.errstate(over="ignore"):
        h = (lengths.astype(np.uint64) + np.uint64(1)) * _M1
    longest = int(lengths.max()) if n else 0
    if longest <= 2 * HASH_BYTES:
        h = _mix_words(h, windows, starts, lengths, longest)
    else:  # a long string: its head and its tail
        head = np.minimum(lengths, HASH_BYTES)
        h = _mix_words(h, windows, starts, head, HASH_BYTES)
        tail = np.minimum(np.maximum(lengths - HASH_BYTES, 0), HASH_BYTES)
        h = _mix_words(h, windows, starts + lengths - tail, tail, HASH_BYTES)
    h = _finish(h)
    if values.null_count:
        h[~np.asarray(values.is_valid())] = 0
    return h


def _mix_words(h: np.ndarray, windows: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               longest: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        for word in range(math.ceil(longest / 8)):
            left = lengths - 8 * word
            active = left > 0
            at = np.where(active, starts + 8 * word, 0)
            value = windows[at].view("<u8").ravel().copy()
            keep = np.clip(left, 0, 8).astype(np.uint64)
            short = (np.uint64(1) << (np.minimum(keep, np.uint64(7)) * np.uint64(8))) - np.uint64(1)
            mixed = (h ^ (value & np.where(keep >= 8, _ALL, short))) * _M2
            # Only a string's own words move its hash: equal strings hash equal in any batch.
            h = np.where(active, mixed ^ (mixed >> np.uint64(31)), h)
    return h


def mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 in, uint64 out): every input bit moves every output bit;
    a hash of numbers (positions) for ``Spill.add``."""
    return _finish(h.astype(np.uint64))


def _finish(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of the state moves every bit of the hash."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _M2
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def exact_groups(keys: pa.Array, hashes: np.ndarray, rank: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of equal keys brought together, without a hash table of strings: ``order`` (row
    indices sorted by hash, then by ``rank`` within a key) and ``starts`` (where each distinct
    key's rows begin in ``order``). Exact: neighbours that share a hash are compared as strings,
    and a run of one hash holding several keys (a collision) is sorted by the strings themselves.
    Memory: a few integers a row."""
    n = len(hashes)
    order = np.lexsort((rank, hashes)) if rank is not None else np.argsort(hashes, kind="stable")
    if n < 2:
        return order, np.zeros(min(n, 1), np.int64)
    h = hashes[order]
    same = h[1:] == h[:-1]
    pairs = np.flatnonzero(same)
    if len(pairs):
        equal = np.asarray(pc.equal(keys.take(pa.array(order[pairs])), keys.take(pa.array(order[pairs + 1]))))
        same[pairs] = equal
        if not equal.all():
            _untangle(keys, rank, order, same, h, pairs[~equal])
    return order, np.flatnonzero(np.concatenate([[True], ~same]))


def _untangle(keys: pa.Array, rank: np.ndarray | None, order: np.ndarray, same: np.ndarray, h: np.ndarray,
              clashes: np.ndarray) -> None:
    """Re-sort the runs of one hash that hold several keys by (key, rank), in place."""
    bounds = np.concatenate([[0], np.flatnonzero(h[1:] != h[:-1]) + 1, [len(h)]])
    for lo, hi in {(int(bounds[i]), int(bounds[i + 1])) for i in np.searchsorted(bounds, clashes, side="right") - 1}:
        rows = order[lo:hi]
        values = keys.take(pa.array(rows)).to_pylist()
        ranks = rank[rows] if rank is not None else np.arange(hi - lo)
        resorted = sorted(range(hi - lo), key=lambda i: (values[i], ranks[i]))
        order[lo:hi] = rows[resorted]
        for i in range(lo, hi - 1):
            same[i] = values[resorted[i - lo]] == values[resorted[i - lo + 1]]


def partitions_for(rows: int) -> int:
    """How many parts a spill of about ``rows`` rows needs (1: it stays in memory)."""
    return 1 if rows <= MEMORY_ROWS else max(2, math.ceil(rows / PARTITION_ROWS))


class Spill:
    """Batches of one schema, split into ``partitions`` parts by a hash the caller gives per
    row; each part read back whole (``part``) or all in turn (``parts``). One part: kept in
    memory. More: Arrow IPC files under a private directory in ``directory`` (else the
    system's temporary directory), removed by ``close``."""

    def __init__(self, schema: pa.Schema, partitions: int, directory: str | None = None):
        self.schema, self.partitions = schema, max(1, partitions)
        self.rows = 0
        self._memory: list[pa.RecordBatch] = []
        self._dir: Path | None = None
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        if self.partitions > 1:
            self._dir = Path(tempfile.mkdtemp(prefix="klein-ray-spill-", dir=directory))

    def part_of(self, hashes: np.ndarray) -> np.ndarray:
        """Each hash's part (its high bits: the low ones may pick hash-table slots later)."""
        return ((hashes >> np.uint64(32)) % np.uint64(self.partitions)).astype(np.int64)

    def add(self, batch: pa.RecordBatch | pa.Table, hashes: np.ndarray) -> None:
        if not len(hashes):
            return
        if isinstance(batch, pa.Table):
            batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else batch.to_batches()[0]
        self.rows += batch.num_rows
        if self._dir is None:
            self._memory.append(batch)
            return
        part = self.part_of(hashes)
        order = np.argsort(part, kind="stable")
        ordered = batch.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(self.partitions + 1))
        for p in range(self.partitions):
            lo, hi = int(bounds[p]), int(bounds[p + 1])
            if hi > lo:
                self._writer(p).write_batch(ordered.slice(lo, hi - lo))

    def _writer(self, p: int) -> pa.ipc.RecordBatchStreamWriter:
        if p not in self._writers:
            assert self._dir is not None
            self._writers[p] = pa.ipc.new_stream(str(self._dir / f"{p:05d}.arrow"), self.schema)
        return self._writers[p]

    def part(self, p: int) -> pa.Table:
        if self._dir is None:
            return pa.Table.from_batches(self._memory, schema=self.schema)
        writer = self._writers.pop(p, None)
        if writer is not None:
            writer.close()
        path = self._dir / f"{p:05d}.arrow"
        if not path.exists():
            return self.schema.empty_table()
        with pa.ipc.open_stream(str(path)) as reader:
            return reader.read_all()

    def parts(self) -> Iterator[pa.Table]:
        for p in range(self.partitions):
            yield self.part(p)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._memory = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The compact checkpoint: which rows are committed, kept in OUT as a few Parquet parts.

``_job/results/{run}-{part}.parquet`` (the results table) doubles as the checkpoint. A part is
written only after its rows' markers were committed, so the checkpoint is always a subset of
the truth: a row it names is done; a row committed after the last part was written (a driver
killed between flushes) is caught by the worker's marker check before rendering. Resuming
reads a listing page and a few parts instead of listing every marker (1,000 keys per request).
Parts are merged when they pile up, so a job killed a hundred times still resumes quickly.
"""

from __future__ import annotations

import io
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klein_ray.storage import NotFound, Store
from klein_ray.types import RowResult

PREFIX = "_job/results/"
FLUSH_ROWS = 10_000
FLUSH_SECONDS = 30.0
COMPACT_PARTS = 16

SCHEMA = pa.schema([
    ("id", pa.string()), ("variant", pa.string()), ("image_key", pa.string()),
    ("meta_key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("seed", pa.int64()),
    ("render_s", pa.float64()), ("worker", pa.string()), ("run_id", pa.string()),
])


class DoneSet:
    """Committed ids as one Arrow array: exact, ~(id length + 8) bytes a row, vectorised lookup."""

    def __init__(self, ids: pa.Array):
        self.ids = pc.unique(ids) if len(ids) else pa.array([], pa.string())

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, ids: list) -> list[bool]:
        """For each id in ``ids``: is it committed?"""
        if not len(self.ids):
            return [False] * len(ids)
        arr = pa.array([i if isinstance(i, str) else None for i in ids], pa.string())
        return pc.is_in(arr, value_set=self.ids).fill_null(False).to_pylist()


class Checkpoint:
    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._part = 0

    def load(self) -> DoneSet:
        chunks = []
        for obj in self.store.list(PREFIX):
            if obj.key.endswith(".parquet"):
                chunks.append(_read(self.store, obj.key).column("id"))
        ids = pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())
        return DoneSet(ids)

    def record(self, result: RowResult) -> None:
        self._rows.append({
            "id": result.id, "variant": result.variant, "image_key": result.image_key,
            "meta_key": result.meta_key, "sha256": result.sha256, "bytes": result.bytes,
            "width": result.width, "height": result.height, "seed": result.seed,
            "render_s": result.timings.get("render"), "worker": result.worker, "run_id": self.run_id,
        })
        if len(self._rows) >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        _write(self.store, f"{PREFIX}{self.run_id}-{self._part:05d}.parquet", table)
        self._part += 1
        self._rows.clear()

    def compact(self) -> None:
        """Merge the parts into one when there are many (written first, old parts removed after)."""
        keys = [o.key for o in self.store.list(PREFIX) if o.key.endswith(".parquet")]
        if len(keys) < COMPACT_PARTS:
            return
        merged = pa.concat_tables([_read(self.store, k) for k in keys])
        merged = merged.filter(_first_occurrence(merged.column("id")))
        _write(self.store, f"{PREFIX}compacted-{self.run_id}-{uuid.uuid4().hex[:6]}.parquet", merged)
        for key in keys:
            self.store.delete(key)


def _first_occurrence(ids: pa.ChunkedArray) -> pa.Array:
    table = pa.table({"id": ids, "i": pa.array(range(len(ids)), pa.int64())})
    firsts = table.group_by("id").aggregate([("i", "min")]).column("i_min")
    keep = [False] * len(ids)
    for i in firsts.to_pylist():
        keep[i] = True
    return pa.array(keep)


def _read(store: Store, key: str) -> pa.Table:
    try:
        # ParquetFile, not read_table: read_table's dataset threads can abort the interpreter at exit.
        return pq.ParquetFile(io.BytesIO(store.get(key))).read()
    except NotFound:
        return SCHEMA.empty_table()


def _write(store: Store, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")

"""The compact checkpoint: which rows are committed, kept in OUT as a few Parquet parts.

``_job/results/*.parquet`` (the results table) doubles as the checkpoint. A part is written
only after its rows' markers were committed, so the checkpoint is always a subset of the truth:
a row it names is done; a row committed after the last part was written (a driver killed
between flushes) is caught by the worker's marker check before rendering. Resuming reads a
listing page and a few parts instead of listing every marker (1,000 keys per request).

Parts are merged like an LSM tree so their number stays small however long a run is and however
often it is killed: every ``MERGE_FANOUT`` parts of one level become one part of the next
(written first, the merged parts deleted after, so a crash in between only duplicates ids),
and a run starts by merging whatever earlier runs left when that is more than a handful.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from klein_ray.output import layout
from klein_ray.storage import NotFound, Store
from klein_ray.storage.tables import get_table, put_table
from klein_ray.types import RowResult

FLUSH_ROWS = 10_000
FLUSH_SECONDS = 30.0
MERGE_FANOUT = 16
WHOLE = 99  # the level of a part that merged every part of the output (named in its key)
LOAD_THREADS = 8

SCHEMA = pa.schema([
    ("id", pa.string()), ("variant", pa.string()), ("image_key", pa.string()),
    ("meta_key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("seed", pa.int64()),
    ("render_s", pa.float64()), ("worker", pa.string()), ("run_id", pa.string()),
])


class DoneSet:
    """Committed ids, exact. A frozenset: built once, ~0.2 us a lookup, ~100 bytes an id."""

    def __init__(self, ids: list[str]):
        self._ids = frozenset(ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, row_id: object) -> bool:
        return row_id in self._ids

    def __iter__(self):
        return iter(self._ids)

    def without(self, ids: frozenset[str]) -> DoneSet:
        """These rows are not done after all (``render --verify`` found them broken)."""
        return DoneSet(list(self._ids - ids))

    def mask(self, ids: list) -> list[bool]:
        """For each id in ``ids``: is it committed?"""
        done = self._ids
        return [isinstance(i, str) and i in done for i in ids]


class Checkpoint:
    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._levels: dict[int, list[str]] = {}  # this run's parts per merge level

    def load(self) -> DoneSet:
        """Every committed id the parts name, read in parallel (only the ``id`` column)."""
        keys = self._keys()
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            columns = list(pool.map(lambda k: _read(self.store, k, ["id"]).column("id"), keys))
        ids: list[str] = []
        for column in columns:
            ids.extend(column.to_pylist())
        return DoneSet(ids)

    def records(self, columns: tuple[str, ...] = ("id", "image_key", "sha256", "bytes", "meta_key")
                ) -> Iterator[dict]:
        """The committed rows the parts name, part by part (an id may occur in two parts
        after a crash mid-merge)."""
        for key in self._keys():
            for batch in _read(self.store, key, list(columns)).to_batches():
                yield from batch.to_pylist()

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
        self._add(0, pa.Table.from_pylist(self._rows, schema=SCHEMA))
        self._rows.clear()

    def compact(self, keep: int = 4) -> None:
        """Merge every part in OUT into one if there are more than ``keep``: at the end of a
        run, and at the start of one when killed runs left many."""
        keys = self._keys()
        if len(keys) > keep:
            self._merge(keys, level=WHOLE)

    # -- internals -------------------------------------------------------------------------

    def _keys(self) -> list[str]:
        return [o.key for o in self.store.list(layout.RESULTS) if o.key.endswith(".parquet")]

    def _add(self, level: int, table: pa.Table) -> None:
        key = layout.results_part(self.run_id, level, self._seq)
        self._seq += 1
        put_table(self.store, key, table)
        parts = self._levels.setdefault(level, [])
        parts.append(key)
        if len(parts) >= MERGE_FANOUT:
            self._levels[level] = []
            self._merge(parts, level + 1)

    def _merge(self, keys: list[str], level: int) -> None:
        merged = pa.concat_tables([_read(self.store, k) for k in keys])
        if level == WHOLE:  # a whole-output merge: drop the ids earlier crashes left twice
            merged = _unique_ids(merged)
            key = layout.results_part(self.run_id, level, self._seq)
            self._seq += 1
            put_table(self.store, key, merged)
            self._levels = {}
        else:
            self._add(level, merged)
        for key in keys:
            self.store.delete(key)


def _unique_ids(table: pa.Table) -> pa.Table:
    first = table.append_column("_i", pa.array(range(table.num_rows), pa.int64()))
    keep = first.group_by("id").aggregate([("_i", "min")]).column("_i_min")
    return table.take(keep).sort_by("id") if len(keep) else table


def _read(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return get_table(store, key, columns)
    except NotFound:  # merged and deleted by a concurrent compaction: its rows are elsewhere
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)

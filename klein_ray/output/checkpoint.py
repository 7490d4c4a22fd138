"""The compact checkpoint: which rows are committed, kept in OUT as a few Parquet parts.

``_job/results/*.parquet`` (the results table) doubles as the checkpoint. It is a cache of the
markers, never the truth: a part is written only after its rows' markers were committed (judged
by the ledger's predicate), so a row it names was done when it was written; a row committed
after the last part (a driver killed between flushes) is caught by the worker's marker check
before rendering. Resuming reads a listing page and a few parts instead of listing every marker
(1,000 keys per request). Each row carries what it was rendered from (``inputs``: the manifest
row's digest; ``setup``: the variant's), so an edited row is not taken for done.

Parts are merged like an LSM tree so their number stays small however long a run is and however
often it is killed: every ``MERGE_FANOUT`` parts of one level become one part of the next
(written first, the merged parts deleted after, so a crash in between only duplicates ids),
and a run starts by merging whatever earlier runs left when that is more than a handful.

A part that cannot be read (cut short, garbage) is not fatal: its rows are simply not known
committed here, and the worker's marker check finds them (so the truth is rebuilt from the
markers as the run goes). Under the lease (``set_aside=True``: the driver) it is moved to
``_job/damaged/``, never deleted; read-only callers skip it and say so (``damaged``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute

from klein_ray.output import layout
from klein_ray.storage import NotFound, Store
from klein_ray.storage.tables import get_table, put_table
from klein_ray.types import RowResult

log = logging.getLogger(__name__)

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
    ("inputs", pa.string()), ("setup", pa.string()), ("epoch", pa.int64()),
])

# How a row the checkpoint names stands against the manifest row with its id now.
DONE, STALE, OUTDATED = "done", "stale", "outdated"


class DoneSet:
    """Committed ids, exact, each with the row digest and variant setup it was rendered from
    (None where a part written before these were recorded says nothing: taken as current)."""

    def __init__(self, rows: dict[str, tuple[str | None, str | None]]):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, row_id: object) -> bool:
        return row_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def without(self, ids: Iterable[str]) -> DoneSet:
        """These rows are not done after all (``render --verify`` found them broken)."""
        drop = set(ids)
        return DoneSet({k: v for k, v in self._rows.items() if k not in drop})

    def standing(self, row_id: object, digest: Callable[[], str], setup: str) -> str | None:
        """None if the checkpoint does not name the row; else ``DONE``, ``STALE`` (the row was
        edited since: render it again) or ``OUTDATED`` (rendered under another setup of its
        variant). ``digest`` is called only for a row the checkpoint names."""
        recorded = self._rows.get(row_id) if isinstance(row_id, str) else None
        if recorded is None:
            return None
        inputs, was = recorded
        if inputs and inputs != digest():
            return STALE
        if was and setup and was != setup:
            return OUTDATED
        return DONE


class Checkpoint:
    def __init__(self, store: Store, run_id: str, set_aside: bool = False):
        self.store = store
        self.run_id = run_id
        self.set_aside = set_aside  # move damaged parts to _job/damaged/ (only under the lease)
        self.damaged: list[str] = []  # parts found unreadable
        self.epoch = 0  # the lease's epoch, recorded with every row this run commits
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._levels: dict[int, list[str]] = {}  # this run's parts per merge level

    def load(self) -> DoneSet:
        """Every committed id the parts name, with what it was rendered from, read in parallel."""
        keys = self._keys()
        with ThreadPoolExecutor(LOAD_THREADS) as pool:
            tables = list(pool.map(lambda k: self._read(k, ["id", "inputs", "setup", "epoch"]), keys))
        rows: dict[str, tuple[str | None, str | None]] = {}
        epochs: dict[str, int] = {}
        for table in tables:
            if table is None:
                continue
            ids, inputs, setups, written = (table.column(c).to_pylist() for c in ("id", "inputs", "setup", "epoch"))
            for row_id, recorded, epoch in zip(ids, zip(inputs, setups), written):
                # An id recorded twice (rendered again, or a crash mid-merge): the newest epoch
                # wins; within one, the later part (key order is run order).
                if epochs.get(row_id, -1) <= (epoch or 0):
                    rows[row_id], epochs[row_id] = recorded, epoch or 0
        return DoneSet(rows)

    def records(self, columns: tuple[str, ...] = ("id", "image_key", "sha256", "bytes", "meta_key")
                ) -> Iterator[dict]:
        """The committed rows the parts name, part by part (an id may occur in two parts
        after a crash mid-merge)."""
        for key in self._keys():
            table = self._read(key, list(columns))
            if table is not None:
                for batch in table.to_batches():
                    yield from batch.to_pylist()

    def revoke(self, ids: Iterable[str]) -> None:
        """These rows are not committed after all (``render --verify`` is about to repair
        them): the checkpoint is rewritten without them, before any repair starts, so that an
        interrupted repair never leaves a row the checkpoint calls done."""
        drop = set(ids)
        if drop:
            self._merge(self._keys(), level=WHOLE, drop=drop)

    def record(self, result: RowResult) -> None:
        self._rows.append({
            "id": result.id, "variant": result.variant, "image_key": result.image_key,
            "meta_key": result.meta_key, "sha256": result.sha256, "bytes": result.bytes,
            "width": result.width, "height": result.height, "seed": result.seed,
            "render_s": result.timings.get("render"), "worker": result.worker, "run_id": self.run_id,
            "inputs": result.inputs or None, "setup": result.setup or None, "epoch": self.epoch,
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

    def _merge(self, keys: list[str], level: int, drop: set[str] | None = None) -> None:
        tables = [(key, self._read(key)) for key in keys]
        merged = pa.concat_tables([table for _, table in tables if table is not None] or [SCHEMA.empty_table()])
        if drop:
            merged = merged.filter(pa.compute.invert(pa.compute.is_in(merged.column("id"), pa.array(sorted(drop)))))
        if level == WHOLE:  # a whole-output merge: drop the ids earlier crashes left twice
            merged = _unique_ids(merged)
            key = layout.results_part(self.run_id, level, self._seq)
            self._seq += 1
            put_table(self.store, key, merged)
            self._levels = {}
        else:
            self._add(level, merged)
        for key, table in tables:
            if table is not None:  # a damaged part was set aside (or is left for the driver to)
                self.store.delete(key)

    def _read(self, key: str, columns: list[str] | None = None) -> pa.Table | None:
        """A part (in SCHEMA, columns older parts lack filled with nulls), or None when it is
        damaged: then it is set aside, or left for the driver, with a warning."""
        try:
            table = get_table(self.store, key)
        except NotFound:  # merged and deleted by a concurrent compaction: its rows are elsewhere
            table = SCHEMA.empty_table()
        except Exception as exc:  # noqa: BLE001 - any way a part fails to parse: it is damaged
            self._damaged(key, exc)
            return None
        table = _conform(table)
        return table if columns is None else table.select(columns)

    def _damaged(self, key: str, exc: Exception) -> None:
        self.damaged.append(key)
        if not self.set_aside:
            log.warning("checkpoint part %s cannot be read (%s); its rows are judged by their "
                        "markers instead", key, type(exc).__name__)
            return
        kept = set_aside(self.store, key)
        log.warning("checkpoint part %s cannot be read (%s): moved to %s; its rows are checked "
                    "against their markers as the run goes", key, type(exc).__name__, kept)


def set_aside(store: Store, key: str) -> str:
    """Move a damaged job file under ``_job/damaged/`` (copied, then removed): kept for a
    person to look at, out of every reader's way. Returns where it went."""
    kept = f"{layout.DAMAGED}{time.strftime('%Y%m%dT%H%M%S')}-{key.rsplit('/', 1)[-1]}"
    try:
        store.put(kept, store.get(key))
    except NotFound:
        return kept
    store.delete(key)
    return kept


def _conform(table: pa.Table) -> pa.Table:
    """A part in SCHEMA: columns it lacks (written by an older klein-ray) as nulls."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def _unique_ids(table: pa.Table) -> pa.Table:
    """One record per id: the newest (highest epoch; within one, the later part: a row rendered
    again because it went stale is recorded after its first render)."""
    order = pa.compute.fill_null(table.column("epoch"), 0).to_numpy(zero_copy_only=False).astype("int64")
    rank = order * (table.num_rows + 1) + np.arange(table.num_rows, dtype="int64")
    indexed = table.append_column("_i", pa.array(rank, pa.int64()))
    best = indexed.group_by("id").aggregate([("_i", "max")]).column("_i_max").to_numpy()
    keep = best % (table.num_rows + 1)
    return table.take(pa.array(keep)).sort_by("id") if len(keep) else table

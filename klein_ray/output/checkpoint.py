"""The compact checkpoint: which rows are committed, kept in OUT as a few Parquet parts.

``_job/results/*.parquet`` (the results table) doubles as the checkpoint. It is a cache of the
markers, never the truth: a part is written only after its rows' markers were committed (judged
by the ledger's predicate), so a row it names was done when it was written; a row committed
after the last part (a driver killed between flushes) is caught by the worker's marker check
before rendering. Each row carries what it was rendered from (``inputs``: the manifest row's
digest; ``setup``: the variant's) and where it came from (``Origin``: the manifest file, that
file's content tag, the row's position, its setup group), so that a resume can find the rows of
an unchanged manifest file by position, without a string per row (docs/scale.md).

Parts are merged like an LSM tree so their number stays small however long a run is and however
often it is killed: every ``MERGE_FANOUT`` parts of one level become one part of the next
(written first, the merged parts deleted after, so a crash in between only duplicates ids),
and a run starts by merging whatever earlier runs left when that is more than a handful. Merges
stream (``parts.merge``): memory is one row group, whatever the checkpoint's size. Readers
never hold a part either: ``scan`` yields one row group of a few columns at a time.

A part that cannot be read (cut short, garbage) is not fatal: its rows are simply not known
committed here, and the worker's marker check finds them (so the truth is rebuilt from the
markers as the run goes). Under the lease (``set_aside=True``: the driver) it is moved to
``_job/damaged/``, never deleted; read-only callers skip it and say so (``damaged``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from klein_ray.output import layout
from klein_ray.output.parts import SCHEMA, PartDamaged, PartFile, PartRef, merge
from klein_ray.storage import NotFound, Store
from klein_ray.storage.tables import put_table
from klein_ray.types import RowResult

log = logging.getLogger(__name__)

FLUSH_ROWS = 10_000
FLUSH_SECONDS = 30.0
MERGE_FANOUT = 16
WHOLE = 99  # the level of a part that merged every part of the output (named in its key)
RESCANS = 3  # a scan restarted because a part vanished or broke midway, at most this often

__all__ = ["DONE", "OUTDATED", "SCHEMA", "STALE", "Checkpoint", "Chunk", "DoneSet", "Origin", "Rescan"]

# How a row the checkpoint names stands against the manifest row with its id now.
DONE, STALE, OUTDATED = "done", "stale", "outdated"


@dataclass(frozen=True)
class Origin:
    """Where a committed row came from: recorded with it, for a resume by position."""

    file: str  # the manifest file, relative to the manifest (its name in a directory or prefix)
    tag: str  # the file's content tag (sha256 of its bytes) when the row was read
    row: int  # the row's position in that file
    group: str  # its setup group (intake.schema.setup_group)


class DoneSet:
    """Committed ids, exact, each with the row digest and variant setup it was rendered from
    (None where a part written before these were recorded says nothing: taken as current).
    Holds every id in memory: for small outputs and tests. Resume, ``status`` and ``verify``
    read the checkpoint in Arrow batches instead (``Checkpoint.scan``)."""

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


class Rescan(Exception):
    """A part vanished or broke after some of its records were read: read the checkpoint again
    (without it: it is in ``Checkpoint.damaged`` now, or merged into another)."""


@dataclass
class Chunk:
    """One row group of one part: ``table`` holds the columns asked for; ``seq`` is the index of
    its first record in the checkpoint's order (parts in key order: later is newer within an
    epoch)."""

    part: PartFile
    group: int
    seq: int
    table: pa.Table

    def more(self, columns: list[str]) -> pa.Table:
        """Other columns of the same rows."""
        return self.part.read(self.group, columns)


class Checkpoint:
    def __init__(self, store: Store, run_id: str, set_aside: bool = False, tmp_dir: str | None = None):
        self.store = store
        self.run_id = run_id
        self.set_aside = set_aside  # move damaged parts to _job/damaged/ (only under the lease)
        self.tmp_dir = tmp_dir  # where merges spill and buffer (None: the system's temp dir)
        self.damaged: list[str] = []  # parts found unreadable
        self.epoch = 0  # the lease's epoch, recorded with every row this run commits
        self._rows: list[dict] = []
        self._last_flush = time.monotonic()
        self._seq = 0
        self._levels: dict[int, list[str]] = {}  # this run's parts per merge level

    # -- reading -------------------------------------------------------------------------

    def scan(self, columns: list[str], dictionaries: bool = False) -> Iterator[Chunk]:
        """Every record, one row group of ``columns`` at a time, parts in key order
        (``dictionaries``: the few-valued columns as dictionary arrays). Damaged parts are
        skipped (and recorded, and set aside under the lease); ``Rescan`` if one breaks, or
        vanishes (merged meanwhile), after some of its rows were yielded."""
        seq = 0
        for ref in self._refs():
            part = self._open(ref)
            if part is None:
                continue
            for group in range(part.groups):
                try:
                    table = part.read(group, columns, dictionaries)
                except PartDamaged as exc:
                    if isinstance(exc.cause, NotFound):
                        raise Rescan(ref.key) from None
                    self._damaged(ref.key, exc.cause)
                    if group:
                        raise Rescan(ref.key) from None
                    break
                yield Chunk(part, group, seq, table)
                seq += table.num_rows

    def count(self) -> int:
        """Records in the checkpoint (from the parts' footers; an id recorded twice before its
        parts were merged counts twice)."""
        return sum(part.rows for part in filter(None, map(self._open, self._refs())))

    def load(self) -> DoneSet:
        """Every committed id with what it was rendered from (every id in memory: see DoneSet)."""
        rows: dict[str, tuple[str | None, str | None]] = {}
        epochs: dict[str, int] = {}
        columns = ["id", "inputs", "setup", "epoch"]

        def anew() -> None:
            rows.clear()
            epochs.clear()
        for chunk in retrying(lambda: self.scan(columns), anew):
            table = chunk.table
            ids, inputs, setups, written = (table.column(c).to_pylist() for c in ("id", "inputs", "setup", "epoch"))
            for row_id, recorded, epoch in zip(ids, zip(inputs, setups), written):
                # An id recorded twice (rendered again, or a crash mid-merge): the newest epoch
                # wins; within one, the later part (key order is run order).
                if epochs.get(row_id, -1) <= (epoch or 0):
                    rows[row_id], epochs[row_id] = recorded, epoch or 0
        return DoneSet(rows)

    def records(self, columns: tuple[str, ...] = ("id", "image_key", "sha256", "bytes", "meta_key")
                ) -> Iterator[dict]:
        """The committed rows the parts name, a row group at a time (an id may occur in two
        parts after a crash mid-merge)."""
        for chunk in self.scan(list(columns)):
            for batch in chunk.table.to_batches():
                yield from batch.to_pylist()

    # -- writing -------------------------------------------------------------------------

    def revoke(self, ids: Iterable[str]) -> None:
        """These rows are not committed after all (``render --verify`` is about to repair
        them): the checkpoint is rewritten without them, before any repair starts, so that an
        interrupted repair never leaves a row the checkpoint calls done."""
        drop = sorted(set(ids))
        if drop:
            self._merge(self._keys(), level=WHOLE, drop=pa.array(drop, pa.string()))

    def record(self, result: RowResult, origin: Origin | None = None) -> None:
        self._rows.append({
            "id": result.id, "variant": result.variant, "image_key": result.image_key,
            "meta_key": result.meta_key, "sha256": result.sha256, "bytes": result.bytes,
            "width": result.width, "height": result.height, "seed": result.seed,
            "render_s": result.timings.get("render"), "worker": result.worker, "run_id": self.run_id,
            "inputs": result.inputs or None, "setup": result.setup or None, "epoch": self.epoch,
            "file": origin.file if origin else None, "tag": origin.tag if origin else None,
            "row": origin.row if origin else None, "group": origin.group if origin else None,
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

    def _refs(self) -> list[PartRef]:
        return [PartRef(o.key, o.size) for o in self.store.list(layout.RESULTS) if o.key.endswith(".parquet")]

    def _keys(self) -> list[str]:
        return [ref.key for ref in self._refs()]

    def _add(self, level: int, table: pa.Table) -> None:
        key = layout.results_part(self.run_id, level, self._seq)
        self._seq += 1
        put_table(self.store, key, table)
        parts = self._levels.setdefault(level, [])
        parts.append(key)
        if len(parts) >= MERGE_FANOUT:
            self._levels[level] = []
            self._merge(parts, level + 1)

    def _merge(self, keys: list[str], level: int, drop: pa.Array | None = None) -> None:
        """Merge ``keys`` into one part of ``level``, streamed (a whole-output merge also drops
        the older records of ids recorded twice); the merged parts are deleted after. A part
        found damaged midway is set aside (or left) and the merge made again without it."""
        wanted = set(keys)
        refs = [ref for ref in self._refs() if ref.key in wanted]
        while True:
            parts = [p for p in map(self._open, refs) if p is not None]
            key = layout.results_part(self.run_id, level, self._seq)
            self._seq += 1
            try:
                merge(self.store, parts, key, dedup=level == WHOLE, drop=drop, tmp_dir=self.tmp_dir)
                break
            except PartDamaged as exc:
                self._damaged(exc.key, exc.cause)
                refs = [ref for ref in refs if ref.key != exc.key]
        if level == WHOLE:
            self._levels = {}
        else:
            self._levels.setdefault(level, []).append(key)
        for part in parts:  # (a damaged part was set aside, or is left for the driver to)
            self.store.delete(part.key)
        if level != WHOLE and len(self._levels[level]) >= MERGE_FANOUT:
            merged, self._levels[level] = self._levels[level], []
            self._merge(merged, level + 1)

    def _open(self, ref: PartRef) -> PartFile | None:
        """A part opened for reading, or None: vanished (merged and deleted by a concurrent
        compaction: its rows are elsewhere), or damaged (set aside, or left for the driver)."""
        if ref.key in self.damaged:
            return None
        try:
            return PartFile(self.store, ref)
        except PartDamaged as exc:
            if not isinstance(exc.cause, NotFound):
                self._damaged(ref.key, exc.cause)
            return None

    def _damaged(self, key: str, exc: BaseException) -> None:
        if key in self.damaged:
            return
        self.damaged.append(key)
        if not self.set_aside:
            log.warning("checkpoint part %s cannot be read (%s); its rows are judged by their "
                        "markers instead", key, type(exc).__name__)
            return
        kept = set_aside(self.store, key)
        log.warning("checkpoint part %s cannot be read (%s): moved to %s; its rows are checked "
                    "against their markers as the run goes", key, type(exc).__name__, kept)


def retrying(scan: Callable[[], Iterator[Chunk]], reset: Callable[[], object]) -> Iterator[Chunk]:
    """``scan()``'s chunks; when it raises ``Rescan``, ``reset()`` and scan again (the part
    that broke is skipped then), at most ``RESCANS`` times."""
    for attempt in range(RESCANS + 1):
        try:
            yield from scan()
            return
        except Rescan:
            if attempt == RESCANS:
                raise
            reset()


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

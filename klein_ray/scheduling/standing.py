"""Where each manifest row stands against the checkpoint, found by position: a byte per row.

``build`` reads the checkpoint (``Checkpoint.scan``: a row group of a few columns at a time,
never a Python object per record) and marks every manifest row a record names (``RowMarks``:
``DONE``, ``STALE``, ``OUTDATED``). The checkpoint is the ledger's cache of committed rows, so a
row marked here is one the ledger's predicate passed when it was committed; nothing else is
ever marked. Two paths (docs/scale.md states the invariants):

- **By position.** A record names the manifest file it came from, that file's content tag
  (sha256 of its bytes) and the row's position. Where the file's tag is unchanged, the bytes are
  the same, so the row at that position is the very row rendered (same id, same values): the
  record marks that position, ``DONE``, or ``OUTDATED`` when the setup it was rendered under is
  not its setup group's now (computed once per distinct group, not per row).
- **By id.** Records whose file changed since (rows added, removed, reordered, replaced), and
  records of older versions without a position, are matched by their id string: both sides are
  spilled to local disk partitioned by a hash of the id and joined one partition at a time
  (Arrow's hash join on the strings: exact whatever the hash). Only manifest rows whose id hash
  some such record shares are read as Python rows, to compute their digest: the row is
  ``STALE`` when the record's digest differs, else ``OUTDATED`` or ``DONE`` as above.

A row several records name (rendered again, recorded twice, the older record not merged away
yet) takes the standing of its newest record (highest epoch; within one, the later record):
decided in a second pass only over such disputed rows, which exist only between a killed run
and the next compaction. Memory: the marks, one row group, one spill partition.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from klein_ray.intake.manifest import Manifest
from klein_ray.intake.marks import DONE, HIT, MULTI, OUTDATED, STALE, RowMarks
from klein_ray.intake.schema import RENDER_COLUMNS, row_digest, setup_group
from klein_ray.output.checkpoint import RESCANS, Checkpoint, Chunk, Rescan
from klein_ray.output.parts import POSITION
from klein_ray.output.record import resolve_adapters, row_setup
from klein_ray.storage.spill import Spill, mix, partitions_for, string_hashes

DISPUTED = 128  # a scratch bit of the marks while disputes are decided
_RECORDS = pa.schema([("id", pa.string()), ("inputs", pa.string()), ("setup", pa.string()),
                      ("epoch", pa.int64()), ("seq", pa.int64())])
_ROWS = pa.schema([("id", pa.string()), ("file", pa.int32()), ("row", pa.int64()),
                   ("digest", pa.string()), ("group", pa.string())])
_MATCHED = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("epoch", pa.int64()),
                      ("seq", pa.int64()), ("state", pa.uint8())])

SetupOf = Callable[[str], str]  # a setup group -> the setup of its rows now ('' if unknown)


@dataclass
class Standing:
    """Each manifest row's standing (``marks``) and how it was found."""

    marks: RowMarks
    records: int = 0  # checkpoint records read
    by_position: int = 0  # matched by file tag and position
    by_id: int = 0  # matched by id (their file changed since, or they record no position)
    foreign: int = 0  # distinct ids of records matching no manifest row (removed, another manifest)
    damaged: list[str] = field(default_factory=list)  # parts that could not be read

    @property
    def committed(self) -> int:
        """Manifest rows the checkpoint names (current, stale or outdated)."""
        return self.marks.count(DONE | STALE | OUTDATED)


def setup_lookup(setups: dict[str, str], identities: dict[str, dict[str, str]],
                   scales: dict[str, dict[str, float]], default_variant: str) -> SetupOf:
    """The setup of a group's rows under a config: its variant's setup digest (``setups``),
    extended by the adapters the rows name (``identities``, default ``scales``), cached."""
    cache: dict[str, str] = {}

    def setup_of(group: str) -> str:
        if group not in cache:
            try:
                variant, adapters, given = json.loads(group)
            except (TypeError, ValueError):
                cache[group] = ""
                return ""
            variant = variant or default_variant
            used = resolve_adapters(adapters, given, scales.get(variant, {}))
            cache[group] = row_setup(setups.get(variant, ""), used, identities.get(variant, {}))
        return cache[group]
    return setup_of


def build(checkpoint: Checkpoint, manifest: Manifest, setup_of: SetupOf, tmp_dir: str | None = None) -> Standing:
    """Every manifest row's standing against the checkpoint (see the module docstring)."""
    for attempt in range(RESCANS + 1):
        try:
            return _Builder(checkpoint, manifest, setup_of, tmp_dir).run()
        except Rescan:  # a part broke or vanished midway: read again (without it)
            if attempt == RESCANS:
                raise
    raise AssertionError("unreachable")


class _Builder:
    def __init__(self, checkpoint: Checkpoint, manifest: Manifest, setup_of: SetupOf, tmp_dir: str | None):
        self.checkpoint, self.manifest, self.setup_of, self.tmp_dir = checkpoint, manifest, setup_of, tmp_dir
        self.sizes = np.array([f.rows for f in manifest.files], np.int64)
        self.files = {(f.key, tag): i for i, (f, tag) in enumerate(zip(manifest.files, manifest.tags())) if tag}
        self.found = Standing(RowMarks([f.rows for f in manifest.files]))
        total = checkpoint.count()
        self.partitions = partitions_for(total)
        self.filter_bits = 1 << min(30, max(16, math.ceil(math.log2(max(1, total) * 8))))
        self.filter = np.zeros(self.filter_bits, bool)  # the hashes of the ids matched by id

    def run(self) -> Standing:
        with Spill(_RECORDS, self.partitions, self.tmp_dir) as slow, \
                Spill(_MATCHED, self.partitions, self.tmp_dir) as matched:
            for chunk in self.checkpoint.scan(POSITION, dictionaries=True):
                self._chunk(chunk, slow)
            if slow.rows:
                self._by_id(slow, matched)
            self._settle(matched)
        self.found.damaged = list(self.checkpoint.damaged)
        self.found.marks.clear(HIT | MULTI | DISPUTED)
        return self.found

    # -- by position ------------------------------------------------------------------------

    def _positions(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Each record's manifest file index (-1: no current file has its name and tag) and row."""
        files, names = _codes(table.column("file"))
        tags, values = _codes(table.column("tag"))
        # A small table: (name code, tag code) -> file index; its last row and column: null.
        lookup = np.full((len(names) + 1, len(values) + 1), -1, np.int64)
        for f, name in enumerate(names):
            for t, tag in enumerate(values):
                lookup[f, t] = self.files.get((name, tag), -1)
        index = lookup[files, tags]
        rows = np.asarray(pc.fill_null(table.column("row"), -1)).astype(np.int64)
        inside = (index >= 0) & (rows >= 0) & (rows < self.sizes[np.maximum(index, 0)])
        index[~inside] = -1
        return index, rows

    def _outdated(self, setups: pa.ChunkedArray, groups: pa.ChunkedArray) -> np.ndarray:
        """Whether each record was rendered under another setup than its group's now."""
        codes, values = _codes(groups)
        now = pa.array([self.setup_of(v) if v is not None else "" for v in values] + [""], pa.string())
        current = now.take(pa.array(np.where(codes >= 0, codes, len(values))))
        recorded = setups.combine_chunks()
        if pa.types.is_dictionary(recorded.type):
            recorded = recorded.dictionary_decode()
        differ = pc.and_(pc.is_valid(recorded), pc.not_equal(pc.fill_null(recorded, ""), current))
        return np.asarray(pc.and_(differ, pc.not_equal(current, "")))

    def _chunk(self, chunk: Chunk, slow: Spill) -> None:
        table = chunk.table
        self.found.records += table.num_rows
        index, rows = self._positions(table)
        fast = (index >= 0) & np.asarray(table.column("group").is_valid())
        if fast.any():
            outdated = self._outdated(table.column("setup"), table.column("group")) & fast
            self.found.by_position += int(fast.sum())
            for f in np.unique(index[fast]):
                mine = fast & (index == f)
                self.found.marks.hit(int(f), rows[mine & ~outdated], DONE)
                self.found.marks.hit(int(f), rows[mine & outdated], OUTDATED)
        if not fast.all():
            rest = pa.array(~fast)
            extra = chunk.more(["id", "inputs"]).filter(rest)
            setups = table.column("setup").filter(rest)
            setups = setups.cast(pa.string()) if pa.types.is_dictionary(setups.type) else setups
            seq = np.arange(chunk.seq, chunk.seq + table.num_rows, dtype=np.int64)[~fast]
            ids = extra.column("id").combine_chunks()
            batch = pa.record_batch([ids, extra.column("inputs").combine_chunks(), setups.combine_chunks(),
                                     pc.fill_null(table.column("epoch").filter(rest), 0).combine_chunks(),
                                     pa.array(seq)], schema=_RECORDS)
            hashes = string_hashes(ids)
            slow.add(batch, hashes)
            self.filter[(hashes % np.uint64(self.filter_bits)).astype(np.int64)] = True

    # -- by id ------------------------------------------------------------------------------

    def _by_id(self, slow: Spill, matched: Spill) -> None:
        """Join the records matched by id with the manifest rows of their ids."""
        with Spill(_ROWS, self.partitions, self.tmp_dir) as rows:
            for index, _, start, batch in self.manifest.iter_record_batches(["id", *RENDER_COLUMNS], 65536):
                ids = batch.column("id").cast(pa.string())
                hashes = string_hashes(ids)
                hit = self.filter[(hashes % np.uint64(self.filter_bits)).astype(np.int64)]
                hit &= np.asarray(ids.is_valid())
                if not hit.any():
                    continue
                raws = batch.filter(pa.array(hit)).to_pylist()
                at = np.arange(start, start + batch.num_rows, dtype=np.int64)[hit]
                rows.add(pa.record_batch([
                    ids.filter(pa.array(hit)), pa.array(np.full(len(at), index, np.int32)), pa.array(at),
                    pa.array([row_digest(r) for r in raws], pa.string()),
                    pa.array([setup_group(r) for r in raws], pa.string())], schema=_ROWS), hashes[hit])
            for p in range(self.partitions):
                records, found = slow.part(p), rows.part(p)
                if not records.num_rows:
                    continue
                strays = records.join(found.select(["id"]), "id", join_type="left anti")
                self.found.foreign += len(pc.unique(strays.column("id")))
                if found.num_rows:
                    self._apply(records.join(found, "id", join_type="inner"), matched)

    def _apply(self, joined: pa.Table, matched: Spill) -> None:
        inputs, digest = joined.column("inputs"), joined.column("digest")
        stale = np.asarray(pc.fill_null(pc.and_(pc.is_valid(inputs), pc.not_equal(inputs, digest)), False))
        outdated = self._outdated(joined.column("setup"), joined.column("group")) & ~stale
        state = np.where(stale, STALE, np.where(outdated, OUTDATED, DONE)).astype(np.uint8)
        files = np.asarray(joined.column("file")).astype(np.int64)
        rows = np.asarray(joined.column("row")).astype(np.int64)
        self.found.by_id += joined.num_rows
        for f in np.unique(files):
            for s in (DONE, STALE, OUTDATED):
                self.found.marks.hit(int(f), rows[(files == f) & (state == s)], s)
        batch = pa.record_batch([pa.array(files.astype(np.int32)), pa.array(rows),
                                 joined.column("epoch").combine_chunks(), joined.column("seq").combine_chunks(),
                                 pa.array(state)], schema=_MATCHED)
        matched.add(batch, mix((files.astype(np.uint64) << np.uint64(40)) ^ rows.astype(np.uint64)))

    # -- disputes ---------------------------------------------------------------------------

    def _settle(self, matched: Spill) -> None:
        """Rows records name with different standings take their newest record's."""
        marks = self.found.marks
        disputed = {f: marks.disputed(f) for f in range(len(marks.files))}
        disputed = {f: rows for f, rows in disputed.items() if len(rows)}
        if not disputed:
            return
        for f, rows in disputed.items():
            marks.set(f, rows, DISPUTED)
        found: list[pa.Table] = []
        for chunk in self.checkpoint.scan(POSITION, dictionaries=True):  # by position, again
            found.append(self._disputed_by_position(chunk))
        for part in matched.parts():  # by id, as joined
            files = np.asarray(part.column("file")).astype(np.int64)
            found.append(part.filter(pa.array(self._flagged(files, np.asarray(part.column("row"))))))
        every = pa.concat_tables(found)
        order = np.lexsort([np.asarray(every.column(c)) for c in ("seq", "epoch", "row", "file")])
        every = every.take(pa.array(order))
        files, rows = np.asarray(every.column("file")), np.asarray(every.column("row"))
        last = np.ones(len(files), bool)
        last[:-1] = (files[1:] != files[:-1]) | (rows[1:] != rows[:-1])
        states = np.asarray(every.column("state"))
        for f in np.unique(files[last]):
            pick = last & (files == f)
            marks.settle(int(f), rows[pick], states[pick])

    def _disputed_by_position(self, chunk: Chunk) -> pa.Table:
        table = chunk.table
        index, rows = self._positions(table)
        fast = (index >= 0) & np.asarray(table.column("group").is_valid())
        flagged = self._flagged(np.where(fast, index, -1), rows)
        if not flagged.any():
            return _MATCHED.empty_table()
        outdated = self._outdated(table.column("setup"), table.column("group"))[flagged]
        seq = np.arange(chunk.seq, chunk.seq + table.num_rows, dtype=np.int64)[flagged]
        epoch = np.asarray(pc.fill_null(table.column("epoch"), 0)).astype(np.int64)[flagged]
        state = np.where(outdated, OUTDATED, DONE).astype(np.uint8)
        return pa.table([pa.array(index[flagged].astype(np.int32)), pa.array(rows[flagged]), pa.array(epoch),
                         pa.array(seq), pa.array(state)], schema=_MATCHED)


    def _flagged(self, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each (file, row) is marked DISPUTED (file -1: no)."""
        flagged = np.zeros(len(files), bool)
        for f in np.unique(files[files >= 0]):
            mine = files == f
            flagged[mine] = (self.found.marks.files[int(f)][rows[mine]] & DISPUTED) != 0
        return flagged


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """A string column as codes (-1 for null) into its distinct values."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(array.type):
        array = pc.dictionary_encode(array)
    codes = np.asarray(pc.fill_null(array.indices, -1)).astype(np.int64)
    return codes, array.dictionary.to_pylist()

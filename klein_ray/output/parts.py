"""The checkpoint's parts as stored: their schema, how they are read a few columns and one row
group at a time, and how several are merged into one with bounded memory.

A part is a Parquet table under ``_job/results/``. Writers of large parts (merges) write row
groups of ``ROW_GROUP_ROWS``; readers read only the columns they ask for, one row group at a
time, through ranged GETs (``storage.tables.open_table``), so neither side ever holds a part.

Merging (``merge``) streams: every input row group is read, filtered and appended to the output
in turn. A merge that drops the older records of an id (``dedup``: the newest epoch wins; within
one epoch the later record, parts in key order) first spills each record's id and rank to local
disk partitioned by a hash of the id (``storage.spill``), picks each id's newest record one
partition at a time (Arrow's group-by on the id strings: exact whatever the hash), and keeps a
byte per record saying whether it won; a second pass writes the winners. Memory: one row group,
one partition and that byte per record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from klein_ray.storage import Store
from klein_ray.storage.spill import Spill, exact_groups, partitions_for, string_hashes
from klein_ray.storage.tables import TableWriter, open_table

SCHEMA = pa.schema([
    ("id", pa.string()), ("variant", pa.string()), ("image_key", pa.string()),
    ("meta_key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("seed", pa.int64()),
    ("render_s", pa.float64()), ("worker", pa.string()), ("run_id", pa.string()),
    # What the row was rendered from: the manifest row's digest and the variant's setup.
    ("inputs", pa.string()), ("setup", pa.string()), ("epoch", pa.int64()),
    # Where it came from: the manifest file (relative to the manifest), that file's content tag
    # (sha256 of its bytes) and the row's position in it; and its setup group (the row's
    # variant and adapters as the manifest states them). Null in parts of older versions.
    ("file", pa.string()), ("tag", pa.string()), ("row", pa.int64()), ("group", pa.string()),
])
# Columns a resume reads for every record (adjacent in SCHEMA: one ranged read per row group).
POSITION = ["setup", "epoch", "file", "tag", "row", "group"]
# Columns with few distinct values: read as dictionary arrays (codes, and a string per value),
# and so written by merges (a tag is 64 characters: a string per row would be most of a batch).
DICTIONARY = ["setup", "file", "tag", "group", "variant", "run_id"]
MERGED = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in DICTIONARY else f
                    for f in SCHEMA])
ROW_GROUP_ROWS = 262_144  # rows per row group of a merged part: memory of a merge, and reads of a resume
READ_ROWS = 65_536  # rows a merge reads at a time


class PartDamaged(Exception):
    """A part could not be read (cut short, garbage, a damaged page)."""

    def __init__(self, key: str, cause: BaseException):
        super().__init__(f"{key}: {type(cause).__name__}")
        self.key, self.cause = key, cause


@dataclass(frozen=True)
class PartRef:
    key: str
    size: int


class PartFile:
    """One part opened for reading: its row groups, a few columns at a time, in SCHEMA's
    types (columns an older part lacks read as nulls). ``PartDamaged`` on any failure."""

    def __init__(self, store: Store, ref: PartRef):
        self.key = ref.key
        try:
            self._pf: pq.ParquetFile = open_table(store, ref.key, ref.size, read_dictionary=DICTIONARY)
            self.rows = self._pf.metadata.num_rows
            self.groups = self._pf.metadata.num_row_groups
        except Exception as exc:
            raise PartDamaged(ref.key, exc) from exc
        self._names = set(self._pf.schema_arrow.names)

    def read(self, group: int, columns: list[str], dictionaries: bool = False) -> pa.Table:
        """Row group ``group``'s ``columns``; ``dictionaries``: those of DICTIONARY as
        dictionary arrays (else as strings)."""
        present = [c for c in columns if c in self._names]
        try:
            table = self._pf.read_row_group(group, columns=present)
        except Exception as exc:
            raise PartDamaged(self.key, exc) from exc
        return conform(table, columns, dictionaries)

    def batches(self, columns: list[str], dictionaries: bool = False, rows: int = READ_ROWS) -> Iterator[pa.Table]:
        """Every record, ``rows`` at a time, a row group after another (the reader buffers the
        column chunks of the row groups it is given: one at a time)."""
        present = [c for c in columns if c in self._names]
        try:
            for group in range(self.groups):
                for batch in self._pf.iter_batches(batch_size=rows, row_groups=[group], columns=present):
                    yield conform(pa.Table.from_batches([batch]), columns, dictionaries)
        except PartDamaged:
            raise
        except Exception as exc:
            raise PartDamaged(self.key, exc) from exc


def conform(table: pa.Table, columns: list[str] | None = None, dictionaries: bool = False) -> pa.Table:
    """``table`` with exactly ``columns`` (default: SCHEMA's) in SCHEMA's types; the columns it
    lacks (written by an older klein-ray) as nulls; ``dictionaries``: dictionary columns kept."""
    names = SCHEMA.names if columns is None else columns
    arrays = []
    for name in names:
        field = SCHEMA.field(name)
        if name in table.column_names:
            column = table.column(name)
            if not (column.type == field.type or (dictionaries and pa.types.is_dictionary(column.type))):
                column = column.cast(field.type)
            arrays.append(column)
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, names=list(names))


def merge(store: Store, parts: list[PartFile], key: str, dedup: bool, drop: pa.Array | None = None,
          tmp_dir: str | None = None) -> int:
    """Write the records of ``parts`` (in order) as one part at ``key``, streamed: without the
    ids in ``drop``, and with ``dedup`` only each id's newest record. Returns the rows written.
    ``PartDamaged`` if an input turns out damaged midway (nothing is written then)."""
    keep = _winners(parts, tmp_dir) if dedup else None
    seq = 0
    with TableWriter(store, key, MERGED, ROW_GROUP_ROWS, tmp_dir) as writer:
        for part in parts:
            for table in part.batches(SCHEMA.names, dictionaries=True):
                table = _dictionaries(table)
                n = table.num_rows
                mask = np.ones(n, bool) if keep is None else keep[seq:seq + n]
                seq += n
                if drop is not None and len(drop):
                    mask &= ~np.asarray(pc.fill_null(pc.is_in(table.column("id"), value_set=drop), False))
                writer.write(table.filter(pa.array(mask)) if not mask.all() else table)
    return writer.rows


def _dictionaries(table: pa.Table) -> pa.Table:
    """``table`` in MERGED's types (a column an older part lacks is all nulls, not a dictionary)."""
    columns = []
    for field in MERGED:
        column = table.column(field.name)
        if column.type != field.type:
            column = pc.dictionary_encode(column) if pa.types.is_dictionary(field.type) else column.cast(field.type)
            if column.type != field.type:
                column = column.cast(field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=MERGED)


def _winners(parts: list[PartFile], tmp_dir: str | None) -> np.ndarray:
    """A byte per record (in the parts' order): whether it is its id's newest record."""
    total = sum(p.rows for p in parts)
    schema = pa.schema([("id", pa.string()), ("hash", pa.uint64()), ("rank", pa.int64())])
    keep = np.zeros(total, bool)
    seq = 0
    with Spill(schema, partitions_for(total), tmp_dir) as spill:
        for part in parts:
            for table in part.batches(["id", "epoch"]):
                n = table.num_rows
                epoch = np.asarray(pc.fill_null(table.column("epoch"), 0)).astype(np.int64)
                rank = epoch * (total + 1) + np.arange(seq, seq + n, dtype=np.int64)
                ids = table.column("id").combine_chunks()
                hashes = string_hashes(ids)
                spill.add(pa.record_batch([ids, pa.array(hashes), pa.array(rank)], schema=schema), hashes)
                seq += n
        for chunk in spill.parts():
            if chunk.num_rows:
                rank, hashes = np.asarray(chunk.column("rank")), np.asarray(chunk.column("hash"))
                order, starts = exact_groups(chunk.column("id").combine_chunks(), hashes, rank)
                newest = order[np.concatenate([starts[1:], [len(order)]]) - 1]
                keep[rank[newest] % (total + 1)] = True
    return keep

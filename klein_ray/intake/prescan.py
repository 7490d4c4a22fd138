"""The prescan: what a run learns of the whole manifest before anything renders.

``find_duplicates`` is one pass over every column of every file (a damaged page or a bad UTF-8
string stops the job here, exit 2, not halfway through) that finds the rows whose id occurs
more than once (every row with one is rejected: which was meant is unknowable). It is exact and
bounded: each row's id, file and position are spilled to local disk partitioned by a hash of
the id (``storage.spill``), and each partition's rows of equal ids are found by sorting on the
hash and comparing neighbours as strings (``spill.exact_groups``), so two ids that share a hash
are still two ids. Memory: one partition (in memory when the manifest is
small). A run keeps what it found beside its output with the files' content tags, and the next
run over the same bytes skips this pass (``scheduling.resume``).

``count`` is the run's figures, per variant, from the rows' marks (``intake.marks``: where each
row stands against the checkpoint): committed and current (skipped), stale (rendered again),
outdated (skipped unless asked), and the rows to render per variant, reading only the variant
column of the row groups that hold rows to render.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from klein_ray.intake.manifest import Manifest
from klein_ray.intake.marks import DONE, DUP, OUTDATED, STALE, RowMarks
from klein_ray.storage.spill import Spill, exact_groups, partitions_for, string_hashes

DUPLICATES_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("id", pa.string())])
_SPILLED = DUPLICATES_SCHEMA.append(pa.field("hash", pa.uint64()))
SCAN_BATCH_ROWS = 65536


@dataclass
class Prescan:
    duplicates: int = 0  # rows whose id another row shares (each is rejected)
    pending: Counter[str] = field(default_factory=Counter)  # rows to render, per variant
    done: int = 0  # committed and current: skipped
    stale: int = 0  # committed from values the manifest no longer has: rendered again
    outdated: int = 0  # committed under another setup of the variant: skipped unless asked

    @property
    def to_render(self) -> int:
        return sum(self.pending.values())


def id_hash(value: object) -> int:
    """An 8-byte hash of one id (the catalog's reroll keys the ids it avoids by it)."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "big")


def find_duplicates(manifest: Manifest, tmp_dir: str | None = None) -> pa.Table:
    """Every row whose id another row of the manifest shares: (file index, row, id), in file
    and row order. Decodes every column of every file (ManifestError if one cannot be)."""
    found: list[pa.Table] = []
    with Spill(_SPILLED, partitions_for(manifest.total_rows), tmp_dir) as spill:
        for index, _, start, batch in manifest.iter_record_batches(["id"], SCAN_BATCH_ROWS, decode_all=True):
            ids = batch.column(0) if batch.num_columns else pa.nulls(batch.num_rows, pa.string())
            ids = ids.cast(pa.string())
            valid = np.asarray(ids.is_valid())  # a null id is no id: never a duplicate
            if not valid.any():
                continue
            rows = np.arange(start, start + batch.num_rows, dtype=np.int64)[valid]
            kept = ids.filter(pa.array(valid))
            hashes = string_hashes(kept)
            table = pa.record_batch([pa.array(np.full(len(rows), index, np.int32)), pa.array(rows), kept,
                                     pa.array(hashes)], schema=_SPILLED)
            spill.add(table, hashes)
        for part in spill.parts():
            if part.num_rows < 2:
                continue
            order, starts = exact_groups(part.column("id").combine_chunks(), np.asarray(part.column("hash")))
            sizes = np.diff(np.concatenate([starts, [len(order)]]))
            twice = order[np.repeat(sizes > 1, sizes)]
            if len(twice):
                found.append(part.take(pa.array(twice)).select(DUPLICATES_SCHEMA.names))
    if not found:
        return DUPLICATES_SCHEMA.empty_table()
    return pa.concat_tables(found).sort_by([("file", "ascending"), ("row", "ascending")])


def mark_duplicates(marks: RowMarks, duplicates: pa.Table) -> None:
    files = np.asarray(duplicates.column("file"))
    rows = np.asarray(duplicates.column("row"))
    for index in np.unique(files):
        marks.set(int(index), rows[files == index], DUP)


def count(manifest: Manifest, marks: RowMarks, default_variant: str, rerender_outdated: bool = False) -> Prescan:
    """The run's figures from the marks (see the module docstring)."""
    skip = DONE | (0 if rerender_outdated else OUTDATED)
    scan = Prescan(duplicates=marks.count(DUP), done=marks.count(DONE), stale=marks.count(STALE),
                   outdated=marks.count(OUTDATED))

    def wanted(index: int, start: int, rows: int) -> bool:
        return bool(np.any((marks.slice(index, start, rows) & skip) == 0))

    for index, _, start, batch in manifest.iter_record_batches(["variant"], SCAN_BATCH_ROWS, wanted):
        todo = (marks.slice(index, start, batch.num_rows) & skip) == 0
        if not todo.any():
            continue
        if "variant" not in batch.schema.names:
            scan.pending[default_variant] += int(todo.sum())
            continue
        variants = batch.column("variant").filter(pa.array(todo))
        if pa.types.is_dictionary(variants.type):
            variants = variants.dictionary_decode()
        for item in pc.value_counts(variants.cast(pa.string())).to_pylist():
            scan.pending[item["values"] or default_variant] += item["counts"]
    return scan

"""One shard, built or found complete: the export's unit of work (a task of the executor).

1. Judge the shard's rows through the ledger (``judge_marker``: the predicate, and the marker
   it passed). Only committed rows become samples; every other row gets a status (``failed``
   with the latest render's stage and error, ``rejected``, ``pending``) in the per-shard table.
2. The inputs digest (``plan.inputs_digest``) of what the files would hold. If the shard's
   stats marker names that digest and its files are present at their sizes, the shard is
   complete: skipped, nothing read or written.
3. Otherwise the old marker is removed first (a kill from here on leaves a shard without a
   marker: rebuilt by the next run), files of the old build that the new one does not name
   are removed, each part is written into a local temporary file (images read from OUT a
   few at a time, each checked against the sha256 the ledger judged) and stored whole
   (``Store.put_file``: atomic; multipart on S3), then the per-shard table, then the marker.

No loader ever sees half a file: every object appears whole or not at all. A shard rewritten
in place shows its old or its new bytes. Memory: the images in flight (``PREFETCH``) and, for
Parquet, one row group.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.output.export import parquet, webdataset
from klein_ray.output.export.plan import (
    ShardFile,
    ShardResult,
    ShardRow,
    ShardStats,
    ShardTask,
    data_names,
    inputs_digest,
    split_parts,
    stats_key,
    table_key,
)
from klein_ray.output.export.samples import Sample, metadata_digest, sample_key, sample_of
from klein_ray.output.ledger import Ledger
from klein_ray.storage import NotFound, Store, open_store

JUDGE_THREADS = 16
PREFETCH = 8  # images read ahead of the writer
STATUSES = ("exported", "stale", "failed", "rejected", "pending")

TABLE_SCHEMA = pa.schema([
    ("position", pa.int64()), ("key", pa.string()), ("id", pa.string()), ("status", pa.string()),
    ("sha256", pa.string()), ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
    ("manifest_file", pa.string()), ("manifest_row", pa.int64()), ("file", pa.string()),
])


class ShardConflict(Exception):
    """A row's image changed while its shard was written (a render or repair is writing OUT):
    nothing of the shard is final; run the export again."""


@dataclass(frozen=True)
class Entry:
    """Where one row of the shard stands, and its sample if it is exported."""

    row: ShardRow
    status: str
    sample: Sample | None = None
    message: str = ""

    def digest_entry(self) -> list:
        failure = self.row.failure
        return [self.row.position, self.row.id, self.status,
                self.sample.sha256 if self.sample else None,
                metadata_digest(self.sample) if self.sample else None,
                [failure.stage, failure.error_type, failure.message] if failure else None, self.message]


def build_shard(task: ShardTask) -> ShardResult:
    """Build (or skip) one shard: a module-level function, so Ray ships it by reference."""
    plan = task.plan
    return ShardBuilder(open_store(plan.source, plan.storage), open_store(plan.dest, plan.storage)).build(task)


class ShardBuilder:
    """Builds shards of one output (``source``) into one destination (``dest``)."""

    def __init__(self, source: Store, dest: Store):
        self.source = source
        self.dest = dest
        self.ledger = Ledger(source)

    def build(self, task: ShardTask) -> ShardResult:
        entries = self.judge(task.rows)
        inputs = inputs_digest(task.plan.settings(), [e.digest_entry() for e in entries])
        previous = self._previous(task.index)
        if previous is not None and previous.inputs == inputs and self._intact(previous):
            return ShardResult(previous, built=False)
        samples = [e.sample for e in entries if e.sample is not None]
        parts = split_parts([s.size() for s in samples], task.plan.max_shard_bytes)
        names = data_names(task.plan, task.index, len(parts))
        self._clear(task.index, previous, keep=set(names))
        files = tuple(self._write_part(task.plan.format, name, [samples[i] for i in part])
                      for name, part in zip(names, parts))
        table = self._write_table(task.index, entries, files, parts)
        counts = {s: sum(e.status == s for e in entries) for s in STATUSES}
        stats = ShardStats(task.index, inputs, task.plan.settings(), len(entries),
                           counts["exported"] + counts["stale"], counts["stale"], counts["failed"],
                           counts["pending"], counts["rejected"], files, table,
                           tuple(sorted({s.ext for s in samples})))
        self.dest.put(stats_key(task.index), stats.to_bytes(), content_type="application/json")
        return ShardResult(stats, built=True)

    # -- the rows ------------------------------------------------------------------------

    def judge(self, rows: tuple[ShardRow, ...]) -> list[Entry]:
        """Each row's status, committed rows judged through the ledger (``JUDGE_THREADS`` at once)."""
        asked = [r for r in rows if r.rejected is None and r.id is not None]
        with ThreadPoolExecutor(JUDGE_THREADS, thread_name_prefix="klein-ray-export") as pool:
            verdicts = dict(zip((r.position for r in asked), pool.map(self.ledger.judge_marker,
                                                                      [r.id for r in asked])))
        entries = []
        for row in rows:
            verdict = verdicts.get(row.position)
            if isinstance(verdict, tuple):
                record, marker = verdict
                stale = record.inputs is not None and record.inputs != row.digest
                entries.append(Entry(row, "stale" if stale else "exported", sample_of(row.position, record, marker)))
            elif row.rejected is not None or row.id is None:
                entries.append(Entry(row, "rejected", message=row.rejected or "the row has no id"))
            elif row.failure is not None:
                entries.append(Entry(row, "failed"))
            else:
                problem = "not rendered yet" if verdict is None or not verdict.present else verdict.problem
                entries.append(Entry(row, "pending", message=problem))
        return entries

    # -- the files -----------------------------------------------------------------------

    def _write_part(self, fmt: str, name: str, samples: list[Sample]) -> ShardFile:
        with tempfile.TemporaryDirectory(prefix="klein-ray-export-") as tmp:
            path = Path(tmp) / "shard"
            if fmt == "webdataset":
                with open(path, "wb") as fh:
                    tar = webdataset.TarShardWriter(fh)
                    for sample, image in self._images(samples):
                        tar.add(sample, image)
                    tar.close()
                content_type = webdataset.CONTENT_TYPE
            else:
                table = parquet.ParquetShardWriter(path)
                for sample, image in self._images(samples):
                    table.add(sample, image)
                table.close()
                content_type = parquet.CONTENT_TYPE
            sha, size = _file_digest(path)
            self.dest.put_file(name, path, content_type=content_type)
        return ShardFile(name, len(samples), size, sha)

    def _images(self, samples: list[Sample]) -> Iterator[tuple[Sample, bytes]]:
        """Each sample with its image bytes, read ``PREFETCH`` ahead, in order; each checked
        against the sha256 the ledger judged (a row replaced meanwhile is a ``ShardConflict``)."""
        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="klein-ray-export-read") as pool:
            pending: deque[tuple[Sample, Future[bytes]]] = deque()
            for sample in samples:
                pending.append((sample, pool.submit(self._image, sample)))
                if len(pending) >= PREFETCH:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()

    def _image(self, sample: Sample) -> bytes:
        try:
            data = self.source.get(sample.image_key)
        except NotFound:
            data = b""
        if hashlib.sha256(data).hexdigest() != sample.sha256:
            raise ShardConflict(f"row {sample.id}: {sample.image_key} changed while its shard was written "
                                "(is a render writing this output?); run the export again")
        return data

    def _write_table(self, index: int, entries: list[Entry], files: tuple[ShardFile, ...],
                     parts: list[list[int]]) -> ShardFile:
        """Every row of the shard with its status (img2dataset's per-shard parquet)."""
        file_of = {}
        exported = [e for e in entries if e.sample is not None]
        for part, shard_file in zip(parts, files):
            for i in part:
                file_of[exported[i].row.position] = shard_file.name
        rows = []
        for e in entries:
            failure = e.row.failure if e.status == "failed" else None
            rows.append({"position": e.row.position, "key": sample_key(e.row.position), "id": e.row.id,
                         "status": e.status, "sha256": e.sample.sha256 if e.sample else None,
                         "stage": failure.stage if failure else None,
                         "error_type": failure.error_type if failure else None,
                         "message": failure.message if failure else (e.message or None),
                         "manifest_file": e.row.manifest_file, "manifest_row": e.row.manifest_row,
                         "file": file_of.get(e.row.position)})
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=TABLE_SCHEMA), buf)
        data, key = buf.getvalue(), table_key(index)
        self.dest.put(key, data, content_type=parquet.CONTENT_TYPE)
        return ShardFile(key, len(exported), len(data), hashlib.sha256(data).hexdigest())

    # -- the marker ----------------------------------------------------------------------

    def _previous(self, index: int) -> ShardStats | None:
        try:
            return ShardStats.from_bytes(self.dest.get(stats_key(index)))
        except NotFound:
            return None

    def _intact(self, stats: ShardStats) -> bool:
        """Every file the marker names is there at its size (a removed or truncated file: rebuilt)."""
        for f in (*stats.files, stats.table):
            info = self.dest.head(f.name)
            if info is None or info.size != f.filesize:
                return False
        return True

    def _clear(self, index: int, previous: ShardStats | None, keep: set[str]) -> None:
        """Before rebuilding: the marker first (the shard is incomplete from now on), then the
        old build's files the new one will not replace (a shard whose parts changed)."""
        self.dest.delete(stats_key(index))
        for f in previous.files if previous is not None else ():
            if f.name not in keep:
                self.dest.delete(f.name)


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size

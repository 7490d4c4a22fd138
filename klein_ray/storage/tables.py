"""Parquet tables stored as objects in a ``Store`` (the checkpoint and the job log).

Small tables are read and written whole (``get_table``, ``put_table``). Large ones never are:
``open_table`` reads a stored table through ranged GETs, so that a reader asking for a few
columns of a few row groups fetches only those (a 100M-row checkpoint is gigabytes; its
positional columns are a few percent of it), and ``TableWriter`` streams record batches into a
local temporary file in bounded row groups and stores it whole at the end (``Store.put_file``:
a multipart upload on S3, a rename locally), so memory stays one row group whatever the size.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.storage.base import NotFound, Store

ROW_GROUP_ROWS = 1_000_000  # rows per row group of a streamed table: one read of its narrow columns
MIN_READ = 64 * 1024  # the smallest ranged GET a table reader makes (footers come in small reads)


def get_table(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """Read ``key`` (NotFound if absent). ParquetFile, not read_table: read_table's dataset
    thread pool intermittently aborts the interpreter at exit (seen 1 run in 4)."""
    return pq.ParquetFile(io.BytesIO(store.get(key))).read(columns=columns)


def put_table(store: Store, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")


class StoredFile(io.RawIOBase):
    """A stored object as a read-only, seekable file: each read is a ranged GET (at least
    ``MIN_READ`` bytes, the last one kept), so pyarrow reads only what it asks for."""

    def __init__(self, store: Store, key: str, size: int):
        super().__init__()
        self.store, self.key, self.size = store, key, size
        self._pos = 0
        self._block_at, self._block = -1, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        size = max(0, min(size, self.size - self._pos))
        if size == 0:
            return b""
        start, end = self._pos, self._pos + size
        if not (self._block_at <= start and end <= self._block_at + len(self._block)):
            want = max(size, MIN_READ)
            self._block_at, self._block = start, self.store.get_range(self.key, start, want)
        data = self._block[start - self._block_at:end - self._block_at]
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def open_table(store: Store, key: str, size: int | None = None,
               read_dictionary: list[str] | None = None) -> pq.ParquetFile:
    """A stored Parquet table, opened for reading columns and row groups through ranged GETs
    (``size``: the object's, from a listing, else one HEAD; ``read_dictionary``: columns read
    as dictionary arrays, a string per distinct value). NotFound if absent; a damaged footer
    raises what pyarrow raises."""
    if size is None:
        info = store.head(key)
        if info is None:
            raise NotFound(key)
        size = info.size
    return pq.ParquetFile(StoredFile(store, key, size), pre_buffer=True, read_dictionary=read_dictionary)


class TableWriter:
    """Record batches streamed into one stored Parquet table, in row groups of at most
    ``row_group_rows``: buffered to a local temporary file (under ``tmp_dir``, else the
    system's), stored whole by ``close`` (nothing at ``key`` until then; ``abort`` stores
    nothing). Memory: one row group."""

    def __init__(self, store: Store, key: str, schema: pa.Schema, row_group_rows: int = ROW_GROUP_ROWS,
                 tmp_dir: str | None = None):
        self.store, self.key, self.schema, self.row_group_rows = store, key, schema, row_group_rows
        fd, name = tempfile.mkstemp(prefix=".klein-ray-table-", suffix=".parquet", dir=tmp_dir)
        os.close(fd)
        self.path = Path(name)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(self.path), schema)
        self._pending: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        for part in (batch.to_batches() if isinstance(batch, pa.Table) else [batch]):
            while part.num_rows:
                take = min(part.num_rows, self.row_group_rows - self._buffered)
                self._pending.append(part.slice(0, take))
                self._buffered += take
                part = part.slice(take)
                if self._buffered >= self.row_group_rows:
                    self._flush()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=self.row_group_rows)
            self.rows += table.num_rows
        self._pending, self._buffered = [], 0

    def close(self) -> None:
        """Store the table at ``key`` (the object appears whole, or not at all)."""
        try:
            self._flush()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self.store.put_file(self.key, self.path, content_type="application/vnd.apache.parquet")
        finally:
            self.path.unlink(missing_ok=True)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

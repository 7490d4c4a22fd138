"""Manifests klein-ray writes itself (`expand`, `reroll`): deterministic Parquet, published whole.

The same rows give the same bytes: columns in the schema's order, row groups of exactly
``ROW_GROUP_ROWS`` rows (the last one shorter), zstd, and no timestamp anywhere (pyarrow writes
its version as ``created_by``, so the bytes are those of one pyarrow version). Rows are buffered
as Arrow record batches of ``BATCH_ROWS`` (Python objects live only that long), so a million
rows are written in bounded memory. The file is written to a private temporary directory and
put at its destination only when complete (``Store.put_file``: a rename, or an S3 upload that
appears whole): there is never half a manifest, and on any error nothing at all.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.config import StorageConfig
from klein_ray.storage import file_destination, open_store

ROW_GROUP_ROWS = 65_536
BATCH_ROWS = 8_192
PARQUET_TYPE = "application/vnd.apache.parquet"


class ManifestWriter:
    """Rows in, one Parquet file out (see the module docstring). Use as a context manager:
    ``publish()`` inside it puts the file; leaving it without (an error) discards it."""

    def __init__(self, schema: pa.Schema, dest: str, storage: StorageConfig | None = None):
        self.schema = schema
        self.root, self.key = file_destination(dest, "manifest destination", "manifest.parquet")
        self.storage = storage or StorageConfig()
        self.rows = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="klein-ray-manifest-"))
        self.path = self._tmp / "manifest.parquet"
        self._writer = pq.ParquetWriter(self.path, schema, compression="zstd", use_dictionary=True,
                                        write_statistics=True)
        self._rows: list[dict[str, Any]] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def add(self, row: dict[str, Any]) -> None:
        """One row (schema columns it lacks are null; keys outside the schema are ignored)."""
        self._rows.append(row)
        self.rows += 1
        if len(self._rows) >= BATCH_ROWS:
            self._batch()

    def _batch(self) -> None:
        if not self._rows:
            return
        self._pending.append(pa.RecordBatch.from_pylist(self._rows, schema=self.schema))
        self._pending_rows += len(self._rows)
        self._rows = []
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as one row group."""
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table.slice(0, rows), row_group_size=ROW_GROUP_ROWS)
        rest = table.slice(rows)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> Path:
        """Finish the file (still private); its local path."""
        self._batch()
        while self._pending_rows:
            self._flush(min(self._pending_rows, ROW_GROUP_ROWS))
        self._writer.close()
        return self.path

    def publish(self) -> str:
        """Put the finished file at its destination; the URI it was written to."""
        store = open_store(self.root, self.storage)
        store.put_file(self.key, self.path, content_type=PARQUET_TYPE)
        return store.url_of(self.key)

    def discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - closed already, or broken by the error being handled
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

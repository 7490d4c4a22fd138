"""Parquet tables stored as single objects in a ``Store`` (the checkpoint and the job log)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.storage.base import Store


def get_table(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """Read ``key`` (NotFound if absent). ParquetFile, not read_table: read_table's dataset
    thread pool intermittently aborts the interpreter at exit (seen 1 run in 4)."""
    return pq.ParquetFile(io.BytesIO(store.get(key))).read(columns=columns)


def put_table(store: Store, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.put(key, buf.getvalue(), content_type="application/vnd.apache.parquet")

"""The products table a catalog names: CSV, Parquet or JSONL, local or ``s3://``, streamed.

CSV is read line by line with every value as text (``00123`` stays ``00123``; templates convert
with ``|int`` or ``|float``), Parquet in record batches with its own types, JSONL one object per
line. An ``s3://`` table is first copied to a private temporary file (streamed to disk). Each row
comes with what a message needs to point at it: the file, the row's number (CSV and Parquet: data
rows counted from 1, the header not counted; JSONL: the line) and its first column's value.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from klein_ray.config import StorageConfig
from klein_ray.intake.catalog.definition import CatalogError
from klein_ray.storage import NotFound, StorageError, open_store
from klein_ray.uris import FILE, S3, UriError, parse

PARQUET_BATCH_ROWS = 8192
LABEL_CHARS = 60  # the most characters of a first column's value a message quotes


@dataclass(frozen=True)
class ProductRow:
    """One product: its values, and where it is (for messages)."""

    index: int  # 0-based position among the table's products (template variable product_index)
    number: int  # the row's number as the message gives it (see the module docstring)
    values: dict[str, Any]
    where: str  # "products.csv row 3 (sku 'A-1')"


class ProductTable:
    """The products table, opened (and copied from S3) once; iterate ``rows()`` as often as
    needed. Use as a context manager."""

    def __init__(self, uri: str, fmt: str, base_dir: Path, storage: StorageConfig | None = None):
        self.name = uri
        self.fmt = fmt
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            where = parse(uri, accept=(S3, FILE), base=base_dir, what="products table")
        except UriError as exc:
            raise CatalogError(f"products: {exc}") from None
        if where.kind == S3:
            self.path = self._download(where.uri, storage or StorageConfig())
        else:
            assert where.path is not None
            self.path = where.path
            if not self.path.is_file():
                raise CatalogError(f"products: {uri}: file not found")
        self.columns = self._columns()

    def __enter__(self) -> ProductTable:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _download(self, uri: str, storage: StorageConfig) -> Path:
        parent, _, key = uri.removeprefix("s3://").rpartition("/")
        if not parent or not key:
            raise CatalogError(f"products: {uri}: expected s3://bucket/key")
        self._tmp = tempfile.TemporaryDirectory(prefix="klein-ray-products-")
        dest = Path(self._tmp.name) / "products"
        try:
            open_store(f"s3://{parent}", storage).download(key, dest)
        except NotFound:
            raise CatalogError(f"products: {uri}: no such object") from None
        except StorageError as exc:
            raise CatalogError(f"products: {uri}: {exc}") from None
        return dest

    def _columns(self) -> tuple[str, ...] | None:
        """The table's columns when it has a header or schema (JSONL: None, rows may differ)."""
        if self.fmt == "parquet":
            try:
                return tuple(pq.ParquetFile(self.path).schema_arrow.names)
            except Exception as exc:  # noqa: BLE001 - any way the file fails to parse
                raise CatalogError(f"products: {self.name}: not a readable Parquet file ({exc})") from None
        if self.fmt == "csv":
            with open(self.path, encoding="utf-8-sig", newline="") as fh:
                header = next(csv.reader(fh), None)
            if not header:
                raise CatalogError(f"products: {self.name}: empty, no header row")
            return _checked_header(self.name, header)
        return None

    def rows(self) -> Iterator[ProductRow]:
        readers = {"csv": self._csv_rows, "parquet": self._parquet_rows, "jsonl": self._jsonl_rows}
        try:
            yield from readers[self.fmt]()
        except UnicodeDecodeError as exc:
            raise CatalogError(f"products: {self.name}: not UTF-8 text (byte {exc.start})") from None
        except csv.Error as exc:
            raise CatalogError(f"products: {self.name}: not valid CSV: {exc}") from None

    def _csv_rows(self) -> Iterator[ProductRow]:
        with open(self.path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            header = _checked_header(self.name, next(reader))
            index = 0
            for values in reader:
                if not values:  # a blank line
                    continue
                number = index + 1
                if len(values) != len(header):
                    raise CatalogError(f"products: {self.name} row {number} (line {reader.line_num}): "
                                       f"{len(values)} values, the header has {len(header)} columns")
                yield self._row(index, number, dict(zip(header, values)), "row")
                index += 1

    def _parquet_rows(self) -> Iterator[ProductRow]:
        index = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for values in batch.to_pylist():
                yield self._row(index, index + 1, values, "row")
                index += 1

    def _jsonl_rows(self) -> Iterator[ProductRow]:
        index = 0
        with open(self.path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    values = json.loads(line)
                except ValueError as exc:
                    raise CatalogError(f"products: {self.name} line {line_no}: not valid JSON ({exc})") from None
                if not isinstance(values, dict) or not values:
                    raise CatalogError(f"products: {self.name} line {line_no}: expected a JSON object")
                yield self._row(index, line_no, values, "line")
                index += 1

    def _row(self, index: int, number: int, values: dict[str, Any], unit: str) -> ProductRow:
        first, value = next(iter(values.items()), ("", None))
        shown = str(value)
        shown = shown if len(shown) <= LABEL_CHARS else shown[: LABEL_CHARS - 3] + "..."
        return ProductRow(index, number, values, f"{self.name} {unit} {number} ({first} {shown!r})")


def _checked_header(name: str, header: list[str]) -> tuple[str, ...]:
    columns = tuple(h.strip() for h in header)
    for i, col in enumerate(columns):
        if not col:
            raise CatalogError(f"products: {name}: header column {i + 1} has no name")
        if col in columns[:i]:
            raise CatalogError(f"products: {name}: the header names column {col!r} twice")
    return columns

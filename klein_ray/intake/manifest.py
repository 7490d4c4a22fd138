"""The manifest reader: finds the Parquet files, checks their schema, streams their rows.

A manifest is a Parquet file, a directory of them, or an ``s3://`` prefix of them. Files are
read in record batches, never whole. Problems with the manifest as a whole raise
``ManifestError`` (exit code 2, nothing rendered); problems with one row are the validator's.
Objects under ``s3://`` are first copied to a private temporary directory, streamed to disk.
"""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.config import StorageConfig
from klein_ray.intake.schema import REQUIRED, type_problem
from klein_ray.storage import StorageError, Store, file_sha256, open_store
from klein_ray.types import first_line
from klein_ray.uris import FILE, S3, UriError, is_s3, local_path, parse, split_s3

READ_BATCH_ROWS = 4096
TAG_THREADS, TAG_CHUNK = 4, 8 * 1024 * 1024

class ManifestError(ValueError):
    """The manifest cannot be used as a whole (exit code 2)."""


@dataclass(frozen=True)
class ManifestFile:
    name: str  # as the user knows it (s3:// URI or path), for messages and error records
    path: Path  # local file to read
    rows: int
    columns: tuple[str, ...] = ()
    key: str = ""  # its name relative to the manifest (in a directory or prefix; else the file name)


class Manifest:
    """The Parquet files of one manifest, schema-checked. Use as a context manager."""

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri = uri
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tags: list[str] | None = None
        self._stats: list[tuple[int, int, int]] = []
        self.files = self._open(uri, storage or StorageConfig())

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def base_dir(self) -> Path:
        """What relative paths in the manifest (references) are taken from: the manifest's
        directory (a directory manifest: itself), as its default allowed root is; for a manifest
        in S3, this process's working directory (an S3 manifest allows no local reference by
        default)."""
        if is_s3(self.uri):
            return Path.cwd()
        path = local_path(self.uri)
        return path if path.is_dir() else path.parent

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)

    def tags(self) -> list[str]:
        """Each file's content tag: the sha256 of its bytes (read once, several files at once;
        hashlib hashes at C speed without the GIL). Identical bytes, identical rows: a resume
        finds the committed rows of a file whose tag is unchanged by their positions."""
        if self._tags is None:
            self._stats = [_stat(f.path) for f in self.files]
            with ThreadPoolExecutor(TAG_THREADS, thread_name_prefix="klein-ray-tag") as pool:
                self._tags = list(pool.map(lambda f: file_sha256(f.path, TAG_CHUNK), self.files))
            if [_stat(f.path) for f in self.files] != self._stats:
                self._tags = [""] * len(self.files)  # written to while hashed: no tag is sure
        return self._tags

    def unchanged(self, index: int) -> bool:
        """Whether file ``index`` is as it was when tagged (its size, mtime and inode): a file
        written to during a run (a local manifest edited in place) has rows whose tag is not
        the one computed, so they are recorded without a position."""
        if self._tags is None or not self._tags[index]:
            return False
        return _stat(self.files[index].path) == self._stats[index]

    def iter_record_batches(self, columns: list[str] | None = None, batch_size: int = READ_BATCH_ROWS,
                            wanted: Callable[[int, int, int], bool] | None = None, decode_all: bool = False,
                            ) -> Iterator[tuple[int, ManifestFile, int, pa.RecordBatch]]:
        """(file index, file, index of the batch's first row, batch) of ``columns`` (those the
        file has; all by default). ``wanted(file index, first row, rows)`` is asked per row
        group: a row group it declines is not read at all (a resume skips the row groups whose
        rows are all committed without decoding them). ``decode_all``: as ``iter_batches``."""
        for index, mf in enumerate(self.files):
            present = None if columns is None else [c for c in columns if c in mf.columns]
            try:
                pf = pq.ParquetFile(mf.path)
                groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            except (OSError, pa.ArrowException) as exc:
                raise ManifestError(f"manifest {mf.name}: its data cannot be read ({first_line(exc)[:200]})") from None
            start = 0
            for group, rows in enumerate(groups):
                if wanted is None or wanted(index, start, rows):
                    at = start
                    for batch in _batches(mf, batch_size, None if decode_all else present, [group], pf):
                        if decode_all:
                            _check_text(batch, mf, at)
                            batch = batch.select(present) if present is not None else batch
                        yield index, mf, at, batch
                        at += batch.num_rows
                start += rows

    def iter_rows(self, columns: list[str] | None = None) -> Iterator[tuple[ManifestFile, int, dict[str, Any]]]:
        """Yield (file, row index in file, row dict), one record batch in memory at a time."""
        for mf, start, rows in self.iter_row_batches(columns):
            for offset, row in enumerate(rows):
                yield mf, start + offset, row

    def iter_row_batches(self, columns: list[str] | None = None) -> Iterator[tuple[ManifestFile, int, list[dict]]]:
        """Yield (file, index of the first row, rows as dicts) per record batch."""
        for mf in self.files:
            index = 0
            for batch in _batches(mf, READ_BATCH_ROWS, columns):
                yield mf, index, batch.to_pylist()
                index += batch.num_rows

    def iter_batches(self, columns: list[str], batch_size: int = 65536,
                     decode_all: bool = False) -> Iterator[pa.RecordBatch]:
        """Record batches of only ``columns`` (those the files have), for cheap pre-passes.
        With ``decode_all`` every column is decoded (and dropped): a damaged data page anywhere
        raises ``ManifestError`` now, not halfway through a render."""
        for mf in self.files:
            present = [c for c in columns if c in mf.columns]
            start = 0
            for batch in _batches(mf, batch_size, None if decode_all else present):
                if decode_all:
                    _check_text(batch, mf, start)
                start += batch.num_rows
                yield batch.select(present)

    # -- opening -------------------------------------------------------------------------

    def _open(self, uri: str, storage: StorageConfig) -> list[ManifestFile]:
        try:
            parse(uri, accept=(S3, FILE), what="manifest")
        except UriError as exc:
            raise ManifestError(f"manifest: {exc}") from None
        if is_s3(uri):
            paths = self._download_s3(uri, storage)
        else:
            paths = _local_files(uri)
        files = [replace(self._check(name, path), key=_relative(uri, name)) for name, path in paths]
        if not files:
            raise ManifestError(f"manifest {uri}: no Parquet files found")
        return files

    def _download_s3(self, uri: str, storage: StorageConfig) -> list[tuple[str, Path]]:
        bucket, prefix = split_s3(uri)
        store = open_store(f"s3://{bucket}", storage)
        keys = _s3_parquet_keys(store, prefix, uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="klein-ray-manifest-")
        out = []
        for i, key in enumerate(keys):
            dest = Path(self._tmp.name) / f"{i:06d}.parquet"
            try:
                store.download(key, dest)
            except (StorageError, ValueError) as exc:
                raise ManifestError(f"manifest s3://{bucket}/{key}: cannot read ({type(exc).__name__})") from None
            out.append((f"s3://{bucket}/{key}", dest))
        return out

    @staticmethod
    def _check(name: str, path: Path) -> ManifestFile:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"manifest {name}: not a Parquet file ({exc})") from None
        schema = pf.schema_arrow
        for column in REQUIRED:
            if column not in schema.names:
                close = difflib.get_close_matches(column, schema.names, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ManifestError(f"manifest {name}: missing required column {column!r} (the file has "
                                    f"{', '.join(map(repr, schema.names)) or 'no columns'}){hint}")
        for field in schema:
            problem = type_problem(field.name, field.type)
            if problem is not None:
                raise ManifestError(f"manifest {name}: {problem}")
        return ManifestFile(name, path, pf.metadata.num_rows, tuple(schema.names))


def _batches(mf: ManifestFile, batch_size: int, columns: list[str] | None, row_groups: list[int] | None = None,
             pf: pq.ParquetFile | None = None) -> Iterator[pa.RecordBatch]:
    """The file's record batches; a file whose footer reads but whose data does not (damaged
    pages, truncated row groups) is a manifest that cannot be used: ManifestError, no traceback."""
    try:
        pf = pf or pq.ParquetFile(mf.path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(f"manifest {mf.name}: its data cannot be read ({first_line(exc)[:200]})") from None


def _check_text(batch: pa.RecordBatch, mf: ManifestFile, start: int) -> None:
    """Every string in ``batch`` is valid UTF-8, else ManifestError naming file, row and column
    (decoded later, a bad byte would crash the run where it lies, on every re-run)."""
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            lo, hi = 0, len(column)  # the first row whose value does not validate
            while hi - lo > 1:
                mid = (lo + hi) // 2
                try:
                    column.slice(lo, mid - lo).validate(full=True)
                    lo = mid
                except pa.ArrowInvalid:
                    hi = mid
            raise ManifestError(f"manifest {mf.name}: row {start + lo}: column {name!r} is not valid "
                                "UTF-8 text; write the file with UTF-8 strings") from None


def _stat(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino


def _relative(uri: str, name: str) -> str:
    """A file's name relative to the manifest ``uri`` (a directory or prefix; for a manifest
    that is one file, its file name): what stays the same when the manifest moves."""
    if is_s3(uri):
        base = uri.rstrip("/")
        rest = name[len(base):].lstrip("/") if name.startswith(base) else ""
        return rest or name.rsplit("/", 1)[-1]
    root, path = local_path(uri), Path(name)
    return path.relative_to(root).as_posix() if root.is_dir() and path.is_relative_to(root) else path.name


def _local_files(uri: str) -> list[tuple[str, Path]]:
    path = local_path(uri)
    if path.is_file():
        return [(str(path), path)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
        return [(str(p), p) for p in found]
    raise ManifestError(f"manifest {uri}: no such file or directory")


def _s3_parquet_keys(store: Store, prefix: str, uri: str) -> list[str]:
    """Parquet keys under ``prefix`` of the bucket ``store`` is rooted at. The prefix is a plain
    string prefix, as S3 has it: ``s3://b/m.parquet`` names one object."""
    try:
        keys = [o.key for o in store.list(prefix) if o.key.endswith(".parquet")]
    except (StorageError, ValueError) as exc:
        raise ManifestError(f"manifest {uri}: cannot list ({type(exc).__name__})") from None
    if not keys:
        raise ManifestError(f"manifest {uri}: no Parquet objects under this prefix")
    return sorted(keys)

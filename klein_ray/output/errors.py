"""A run's failed rows, without holding them: counted, the first few kept for the report, the
rest written to a local Arrow file as they come and streamed into ``_job/errors.parquet`` at the
end (``JobLog.finish``). A run that fails 10 million rows holds ``KEEP`` of them in memory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from klein_ray.types import RowError

ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("stage", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("attempts", pa.int32()), ("column", pa.string()),
    ("manifest_file", pa.string()), ("manifest_row", pa.int64()), ("run_id", pa.string()),
])
KEEP = 1000  # errors kept in memory, for the report page (it shows at most these)
FLUSH = 10_000  # errors buffered before they are appended to the local file


class ErrorLog:
    """The run's row errors, in the order they came. ``flagged(error)`` picks errors counted
    apart (the driver's: rows that could not be stored because the storage was unreachable)."""

    def __init__(self, run_id: str = "", flagged: Callable[[RowError], bool] | None = None,
                 tmp_dir: str | None = None):
        self.run_id, self._flag, self._tmp_dir = run_id, flagged, tmp_dir
        self.first: list[RowError] = []  # the first KEEP errors
        self.stages: Counter[str] = Counter()
        self.flagged = 0
        self._count = 0
        self._buffer: list[dict] = []
        self._dir: Path | None = None
        self._segments: list[Path] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, error: RowError) -> None:
        self._count += 1
        self.stages[error.stage] += 1
        if self._flag is not None and self._flag(error):
            self.flagged += 1
        if len(self.first) < KEEP:
            self.first.append(error)
        self._buffer.append(dict(asdict(error), run_id=self.run_id))
        if len(self._buffer) >= FLUSH:
            self._spill()

    def extend(self, errors: Iterable[RowError]) -> None:
        for error in errors:
            self.append(error)

    def __iter__(self) -> Iterator[RowError]:
        """Every error (read back from the local file: for small runs and tests)."""
        for batch in self.batches():
            for row in batch.to_pylist():
                row.pop("run_id", None)
                yield RowError(**row)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Every error as record batches of ERRORS_SCHEMA, in order."""
        if self._writer is not None:  # a segment is complete once closed; later errors start another
            self._writer.close()
            self._writer = None
        for segment in self._segments:
            with pa.ipc.open_stream(str(segment)) as reader:
                yield from reader
        if self._buffer:
            yield pa.RecordBatch.from_pylist(self._buffer, schema=ERRORS_SCHEMA)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._segments = []

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="klein-ray-errors-", dir=self._tmp_dir))
        if self._writer is None:
            self._segments.append(self._dir / f"{len(self._segments):06d}.arrow")
            self._writer = pa.ipc.new_stream(str(self._segments[-1]), ERRORS_SCHEMA)
        self._writer.write_batch(pa.RecordBatch.from_pylist(self._buffer, schema=ERRORS_SCHEMA))
        self._buffer = []

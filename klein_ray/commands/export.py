"""`klein-ray export OUT --format webdataset|parquet --to DEST`: the committed rows of an output
as a dataset, shard by shard, exactly once, resumable.

This command combines what only a command may: the job's manifest (``OUT/_job/state.json``
names it; its row order fixes each shard's rows), the latest run's errors table (failed rows
go in the per-shard tables), and the output's ledger (which rows are committed: asked inside
each shard's task, ``output.export.shard``). Shards are built as independent tasks through the
executor (``--executor local``: threads of this process, the default; ``ray``: Ray tasks
anywhere on the cluster), a few at a time, so memory holds a few shards' row lists and
in-flight images, never the whole output. At the end, files no shard names are removed and the
index and dataset card are rewritten (``output.export.index``). Reads OUT only: it takes no
lease and may run beside a render (a shard then holds the rows committed when it was built; a
rerun adds the rest).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from klein_ray.commands.render import executor_factory
from klein_ray.config import ConfigError, StorageConfig
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.prescan import find_duplicates
from klein_ray.intake.schema import row_digest
from klein_ray.output.export.index import finish, totals
from klein_ray.output.export.plan import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_ROWS_PER_SHARD,
    FORMATS,
    INDEX,
    ExportPlan,
    RowFailure,
    ShardResult,
    ShardRow,
    ShardTask,
)
from klein_ray.output.export.shard import build_shard
from klein_ray.output.joblog import read_errors, read_state
from klein_ray.storage import NotFound, Store, open_store
from klein_ray.uris import redact

MAX_IN_FLIGHT = 64  # shards built at once, at most (each holds its rows and a few images)


@dataclass(frozen=True)
class ExportSummary:
    format: str
    dest: str
    shards: int
    built: int  # shards written by this run
    skipped: int  # shards complete already (inputs unchanged)
    files: int
    bytes: int
    rows: int
    samples: int
    stale: int
    failed: int
    pending: int
    rejected: int
    removed: int  # files of earlier exports no shard names any more
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_output(out: str, fmt: str, dest: str, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, storage: StorageConfig | None = None,
                  executor: str = "local", address: str | None = None, progress: bool = False,
                  build=build_shard) -> ExportSummary:
    """Export the output at ``out`` into ``dest``. ``build`` builds one shard (``build_shard``;
    tests wrap it to stop an export at a chosen instant)."""
    started = time.monotonic()
    storage = storage or StorageConfig()
    _check_arguments(fmt, rows_per_shard, max_shard_bytes)
    source = open_store(out, storage)
    state = read_state(source)
    if not state or not isinstance(state.get("manifest"), str):
        raise ConfigError(f"no klein-ray output at {out} (no _job/state.json naming its manifest): "
                          "render into it first")
    target = open_store(dest, storage)
    if target.uri.rstrip("/") == source.uri.rstrip("/"):
        raise ConfigError(f"--to {dest}: export into a directory or prefix of its own, not OUT itself")
    with Manifest(state["manifest"], storage) as manifest:
        plan = ExportPlan(fmt, source.uri, target.uri, manifest.total_rows, rows_per_shard, max_shard_bytes,
                          storage)
        _check_dest(target, plan)
        tasks = _tasks(plan, manifest, _duplicates(manifest), _failures(source))
        results = _run(plan, tasks, build, executor, address, progress)
    stats = [r.stats for r in results]
    removed = finish(target, plan, stats)
    files = [f for s in stats for f in s.files]
    return ExportSummary(fmt, redact(dest), plan.shards, sum(r.built for r in results),
                         sum(not r.built for r in results), len(files), sum(f.filesize for f in files),
                         **totals(stats), removed=len(removed), seconds=round(time.monotonic() - started, 3))


def _run(plan: ExportPlan, tasks: Iterator[ShardTask], build, executor: str, address: str | None,
         progress: bool) -> list[ShardResult]:
    from tqdm import tqdm

    runner = executor_factory(executor, address)()
    results: list[ShardResult] = []
    samples = skipped = 0
    bar = tqdm(total=plan.shards, disable=not progress, unit="shard", file=sys.stderr, dynamic_ncols=True,
               desc=f"exporting {plan.format}")
    try:
        in_flight = max(2, min(MAX_IN_FLIGHT, int(runner.cluster_cpus())))
        for result in runner.map_tasks(build, tasks, in_flight=in_flight, num_cpus=1.0):
            results.append(result)
            samples, skipped = samples + result.stats.samples, skipped + (not result.built)
            bar.update(1)
            bar.set_postfix(samples=samples, skipped=skipped, refresh=False)
    finally:
        bar.close()
        runner.shutdown([])
    return results


def _check_arguments(fmt: str, rows_per_shard: int, max_shard_bytes: int) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be at least 1 (got {rows_per_shard})")
    if max_shard_bytes < 1:
        raise ConfigError(f"--max-shard-bytes must be at least 1 (got {max_shard_bytes})")


def _check_dest(target: Store, plan: ExportPlan) -> None:
    """DEST holds nothing, or an export of this same format (resumed or refreshed)."""
    try:
        found = json.loads(target.get(INDEX))
    except NotFound:
        if target.head("README.md") is not None:
            raise ConfigError(f"--to {plan.dest}: it has a README.md and no {INDEX}: not a klein-ray "
                              "export; choose an empty directory or prefix") from None
        return
    except ValueError:
        return  # a damaged index is rewritten at the end
    other = found.get("format") if isinstance(found, dict) else None
    if other is not None and other != plan.format:
        raise ConfigError(f"--to {plan.dest} holds a {other} export; export {plan.format} to another "
                          "directory or prefix")


def _tasks(plan: ExportPlan, manifest: Manifest, duplicates: set[str],
           failures: dict[Any, RowFailure]) -> Iterator[ShardTask]:
    """Shard ``k``: the rows at manifest positions ``[k*N, (k+1)*N)``, streamed."""
    rows: list[ShardRow] = []
    index = position = 0
    for mf, start, batch in manifest.iter_row_batches():
        for offset, raw in enumerate(batch):
            rows.append(_shard_row(position, mf.name, start + offset, raw, duplicates, failures))
            position += 1
            if len(rows) == plan.rows_per_shard:
                yield ShardTask(plan, index, tuple(rows))
                index, rows = index + 1, []
    if rows or index == 0:
        yield ShardTask(plan, index, tuple(rows))


def _shard_row(position: int, file: str, row: int, raw: dict[str, Any], duplicates: set[str],
               failures: dict[Any, RowFailure]) -> ShardRow:
    row_id = raw.get("id")
    rejected = None
    if not isinstance(row_id, str):
        row_id, rejected = None, "the row has no id"
    elif row_id in duplicates:
        rejected = f"id {row_id!r} occurs more than once in the manifest (render rejects every such row)"
    failure = failures.get(row_id) if row_id is not None else failures.get((PurePosixPath(file).name, row))
    return ShardRow(position, row_id, file, row, row_digest(raw), rejected, failure)


def _duplicates(manifest: Manifest) -> set[str]:
    """The ids that occur more than once: exact (full strings compared), in bounded memory, as
    render's prescan finds them (``intake.prescan.find_duplicates``)."""
    return set(find_duplicates(manifest).column("id").to_pylist())


def _failures(source: Store) -> dict[Any, RowFailure]:
    """The latest run's failed rows, by id (rows without one by manifest file name and row)."""
    errors = read_errors(source)
    found: dict[Any, RowFailure] = {}
    if errors is None:
        return found
    for e in errors.select(["id", "stage", "error_type", "message", "manifest_file", "manifest_row"]).to_pylist():
        key = e["id"] if e["id"] is not None else (PurePosixPath(e["manifest_file"] or "").name, e["manifest_row"])
        found.setdefault(key, RowFailure(e["stage"] or "", e["error_type"] or "", e["message"] or ""))
    return found

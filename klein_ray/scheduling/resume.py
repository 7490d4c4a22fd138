"""Where a run starts, and which rows it renders: the resume plan and the row stream.

``prepare`` (called holding the output's lease) sweeps what killed writers left, merges the
checkpoint parts killed runs left, audits first when asked (``render --verify``: broken rows are
taken out of the checkpoint before any repair starts), finds where every manifest row stands
against the checkpoint (``standing.build``: a byte per row, by position where the manifest file
is unchanged, by id where it changed), finds the rows whose id another row shares (or reads
what the last run over the same bytes found: ``_job/scan.parquet``) and counts. ``rows`` then
streams the manifest's rows that are to render: a row the checkpoint names with the values it
has now (and its variant's setup) is skipped, without being read when its whole row group is;
one whose values changed (stale) is rendered again (the worker replaces its commit); one
rendered under another setup (outdated) is skipped unless ``rerender_outdated``. Whether a row
is done is the ledger's to say (its checkpoint here, its marker check in the worker), never
this module's. Memory: a byte per manifest row (docs/scale.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from klein_ray.config import JobConfig
from klein_ray.intake.manifest import READ_BATCH_ROWS, Manifest
from klein_ray.intake.marks import DONE, DUP, OUTDATED, RowMarks
from klein_ray.intake.prescan import Prescan, count, find_duplicates, mark_duplicates
from klein_ray.intake.rows import RowValidator, duplicate_id_error
from klein_ray.output.audit import Depth, broken_rows
from klein_ray.output.checkpoint import Origin
from klein_ray.output.errors import ErrorLog
from klein_ray.output.joblog import JobLog, read_scan
from klein_ray.output.ledger import Ledger
from klein_ray.output.record import setup_digest
from klein_ray.scheduling.standing import Standing, build, setup_lookup
from klein_ray.types import RowSpec

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What a run did with its rows so far."""

    committed: int = 0
    skipped: int = 0  # rows committed before: in the checkpoint, or found by the workers
    errors: ErrorLog = field(default_factory=ErrorLog)  # counted; the first kept; the rest on disk
    total: int = 0  # the manifest's rows
    kept: int | None = None  # rows the checkpoint names, current, kept (known once prepared)
    already: int = 0  # rows the workers found committed (outside the checkpoint)
    refused: Counter[str] = field(default_factory=Counter)  # per variant: invalid or duplicate rows

    def remaining(self, failed: int) -> int | None:
        """Rows neither committed (before or now) nor failed: what a re-run would render;
        None before the run knew what was done."""
        if self.kept is None:
            return None
        return max(0, self.total - self.kept - self.already - self.committed - failed)


@dataclass
class ResumePlan:
    """What a run starts from, read from storage under the lease."""

    manifest: Manifest
    standing: Standing  # each manifest row's standing against the checkpoint, and its duplicates
    scan: Prescan  # the counts: to render per variant, done, stale, outdated, duplicates
    output_was_empty: bool  # no marker and no image in OUT: workers skip the marker check
    log: JobLog
    rerender_outdated: bool = False
    repair: dict[str, str] = field(default_factory=dict)  # broken row -> its marker's version then
    origins: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # file name -> (index, key, tag)

    @property
    def pending(self):
        return self.scan.pending

    @property
    def kept(self) -> int:
        """Rows committed before and kept: skipped by this run."""
        return self.scan.done + (0 if self.rerender_outdated else self.scan.outdated)

    @property
    def marks(self) -> RowMarks:
        return self.standing.marks

    def origin(self, row: RowSpec) -> Origin | None:
        """Where a row came from, as its checkpoint record says it; None (matched by id next
        time) when its file has no tag or was written to since it was tagged."""
        where = self.origins.get(row.manifest_file)
        if not where or not where[2] or not row.group or not self.manifest.unchanged(where[0]):
            return None
        return Origin(where[1], where[2], row.manifest_row, row.group)


def spill_dir(cfg: JobConfig) -> str | None:
    """Where large scans spill to local disk: ``run.cache_dir/spill`` if it can be made, else the
    system's temporary directory (None)."""
    path = Path(cfg.run.cache_dir).expanduser() / "spill"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(path)


def prepare(ledger: Ledger, manifest: Manifest, cfg: JobConfig, sources: dict[str, str],
            joblog: JobLog, verify_first: Depth | None = None, rerender_outdated: bool = False,
            may_write: Callable[[], bool] = lambda: True,
            identities: dict[str, dict[str, str]] | None = None) -> ResumePlan:
    """The plan (call it holding the lease): a few requests, not a listing."""
    swept = ledger.store.sweep()  # temporaries of writers killed mid-write (local outputs)
    if swept:
        log.info("removed %d temporary file(s) that killed writers left in the output", swept)
    tmp = spill_dir(cfg)
    ledger.checkpoint.tmp_dir = tmp
    ledger.checkpoint.compact(keep=64)  # killed runs never compacted at their end
    records = ledger.checkpoint.count()
    empty = not records and ledger.output_is_empty()
    repair = broken_rows(ledger, verify_first, tmp) if verify_first and not empty else {}
    if repair and may_write():  # out of the checkpoint before any is claimed for repair
        ledger.checkpoint.revoke(repair)
    ids = identities or {}
    setups = {v: setup_digest(cfg, v, sources[v], ids.get(v)) for v in cfg.variants}
    defaults = {v: {n: a.scale for n, a in c.adapters.items()} for v, c in cfg.variants.items()}
    setup_of = setup_lookup(setups, ids, defaults, cfg.default_variant)
    standing = build(ledger.checkpoint, manifest, setup_of, tmp) if records \
        else Standing(RowMarks([f.rows for f in manifest.files]))
    files = [[f.key, tag, f.rows] for f, tag in zip(manifest.files, manifest.tags())]
    tagged = all(tag for _, tag, _ in files)  # (no tag: a file written to while it was hashed)
    duplicates = read_scan(ledger.store, files) if tagged else None
    scanned = duplicates is None and tagged
    if duplicates is None:  # every column decoded: a damaged manifest stops here (exit 2)
        duplicates = find_duplicates(manifest, tmp)
        scanned = scanned and all(manifest.unchanged(i) for i in range(len(manifest.files)))
    mark_duplicates(standing.marks, duplicates)
    scan = count(manifest, standing.marks, cfg.default_variant, rerender_outdated)
    if may_write():  # not if the lease was lost meanwhile (a long --verify audit)
        joblog.start(manifest.total_rows, setups, {"identities": ids, "scales": defaults}, sources)
        if scanned:
            joblog.put_scan(files, duplicates)
    origins = {f.name: (i, f.key, tag) for i, (f, tag) in enumerate(zip(manifest.files, manifest.tags()))}
    return ResumePlan(manifest, standing, scan, empty, joblog, rerender_outdated, repair, origins)


def rows(plan: ResumePlan, cfg: JobConfig, tally: Tally) -> Iterator[RowSpec]:
    """The plan's valid rows that are to render, streamed; skips and bad rows are tallied.
    A row group whose rows are all skipped is not read."""
    validator = RowValidator(cfg, base_dir=plan.manifest.base_dir)
    skip = DONE | (0 if plan.rerender_outdated else OUTDATED)
    marks = plan.marks

    def wanted(index: int, start: int, n: int) -> bool:
        todo = (marks.slice(index, start, n) & skip) == 0
        tally.skipped += int(n - np.count_nonzero(todo))
        return bool(todo.any())

    for index, mf, start, batch in plan.manifest.iter_record_batches(None, READ_BATCH_ROWS, wanted):
        flags = marks.slice(index, start, batch.num_rows)
        todo = np.flatnonzero((flags & skip) == 0)
        if not len(todo):
            continue
        chosen = batch if len(todo) == batch.num_rows else batch.take(pa.array(todo))
        for offset, raw in zip(todo.tolist(), chosen.to_pylist()):
            row_id, at = raw.get("id"), start + offset
            if flags[offset] & DUP:
                tally.errors.append(duplicate_id_error(str(row_id), mf.name, at))
                tally.refused[raw.get("variant") or cfg.default_variant] += 1
                continue
            checked = validator.validate(raw, mf.name, at)
            if isinstance(checked, list):
                tally.errors.append(checked[0])
                tally.refused[raw.get("variant") or cfg.default_variant] += 1
                continue
            yield replace(checked, repair=plan.repair[checked.id]) if checked.id in plan.repair else checked

"""Where a run starts, and which rows it renders: the resume plan and the row stream.

``prepare`` (called holding the output's lease) sweeps what killed writers left, merges the
checkpoint parts killed runs left, reads the done set, audits first when asked (``render
--verify``: broken rows are taken out of the checkpoint before any repair starts) and prescans
the manifest. ``rows`` then streams the manifest's valid rows that are to render, asking the
same ``standing`` as the prescan, so the counts the run starts with are the ones it follows:
a row the checkpoint names with the values it has now (and its variant's setup) is skipped; one
whose values changed (stale) is rendered again (the worker replaces its commit); one rendered
under another setup (outdated) is skipped unless ``rerender_outdated``. Whether a row is done
is the ledger's to say (its checkpoint here, its marker check in the worker), never this
module's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from klein_ray.config import JobConfig
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.prescan import Prescan, Standing, id_hash, prescan
from klein_ray.intake.rows import RowValidator, duplicate_id_error
from klein_ray.intake.schema import row_digest
from klein_ray.output.audit import Depth, broken_rows
from klein_ray.output.checkpoint import DONE, OUTDATED, DoneSet
from klein_ray.output.joblog import JobLog
from klein_ray.output.ledger import Ledger
from klein_ray.output.record import resolve_adapters, row_setup, setup_digest
from klein_ray.types import RowError, RowSpec

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What a run did with its rows so far."""

    committed: int = 0
    skipped: int = 0  # rows committed before: in the checkpoint, or found by the workers
    errors: list[RowError] = field(default_factory=list)
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
    done: DoneSet  # rows the checkpoint knows committed, with what they were rendered from
    scan: Prescan  # duplicates and the counts: to render per variant, done, stale, outdated
    output_was_empty: bool  # no marker and no image in OUT: workers skip the marker check
    log: JobLog
    standing: Standing  # where a raw row stands against the checkpoint (prescan and rows agree)
    rerender_outdated: bool = False
    repair: dict[str, str] = field(default_factory=dict)  # broken row -> its marker's version then

    @property
    def pending(self):
        return self.scan.pending

    @property
    def kept(self) -> int:
        """Rows committed before and kept: skipped by this run."""
        return self.scan.done + (0 if self.rerender_outdated else self.scan.outdated)


def prepare(ledger: Ledger, manifest: Manifest, cfg: JobConfig, sources: dict[str, str],
            joblog: JobLog, verify_first: Depth | None = None, rerender_outdated: bool = False,
            may_write: Callable[[], bool] = lambda: True,
            identities: dict[str, dict[str, str]] | None = None) -> ResumePlan:
    """The plan (call it holding the lease): a few requests, not a listing."""
    swept = ledger.store.sweep()  # temporaries of writers killed mid-write (local outputs)
    if swept:
        log.info("removed %d temporary file(s) that killed writers left in the output", swept)
    ledger.checkpoint.compact(keep=64)  # killed runs never compacted at their end
    done = ledger.done()
    empty = not len(done) and ledger.output_is_empty()
    repair = broken_rows(ledger, verify_first) if verify_first and not empty else {}
    if repair and may_write():  # out of the checkpoint before any is claimed for repair
        ledger.checkpoint.revoke(repair)
        done = done.without(repair)
    ids = identities or {}
    setups = {v: setup_digest(cfg, v, sources[v], ids.get(v)) for v in cfg.variants}
    defaults = {v: {n: a.scale for n, a in c.adapters.items()} for v, c in cfg.variants.items()}

    def standing(raw: dict[str, Any], variant: str) -> str | None:
        adapters = resolve_adapters(raw.get("adapters"), raw.get("adapter_scales"), defaults.get(variant, {}))
        setup = row_setup(setups.get(variant, ""), adapters, ids.get(variant, {}))
        return done.standing(raw.get("id"), lambda: row_digest(raw), setup)

    scan = prescan(manifest, cfg.default_variant, standing if len(done) else None, rerender_outdated)
    if may_write():  # not if the lease was lost meanwhile (a long --verify audit)
        joblog.start(manifest.total_rows, setups, {"identities": ids, "scales": defaults}, sources)
    return ResumePlan(manifest, done, scan, empty, joblog, standing, rerender_outdated, repair)


def rows(plan: ResumePlan, cfg: JobConfig, tally: Tally) -> Iterator[RowSpec]:
    """The plan's valid rows that are to render, streamed; skips and bad rows are tallied."""
    validator = RowValidator(cfg, base_dir=plan.manifest.base_dir)
    check = len(plan.done) > 0
    for mf, start, batch in plan.manifest.iter_row_batches():
        for offset, raw in enumerate(batch):
            state = plan.standing(raw, raw.get("variant") or cfg.default_variant) if check else None
            if state == DONE or (state == OUTDATED and not plan.rerender_outdated):
                tally.skipped += 1
                continue
            row_id, index = raw.get("id"), start + offset
            if plan.scan.duplicates and isinstance(row_id, str) and id_hash(row_id) in plan.scan.duplicates:
                tally.errors.append(duplicate_id_error(row_id, mf.name, index))
                tally.refused[raw.get("variant") or cfg.default_variant] += 1
                continue
            checked = validator.validate(raw, mf.name, index)
            if isinstance(checked, list):
                tally.errors.append(checked[0])
                tally.refused[raw.get("variant") or cfg.default_variant] += 1
                continue
            yield replace(checked, repair=plan.repair[checked.id]) if checked.id in plan.repair else checked

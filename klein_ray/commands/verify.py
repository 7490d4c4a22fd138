"""`klein-ray verify OUT [--deep] [--sample N]`: audit the committed rows; exit 0 if all sound.

Prints one line per broken row (``id<TAB>problem``), then one per committed row that is stale
or outdated against the job's manifest as it is now (reported, not broken: ``render`` renders
stale rows again), and a JSON summary last. Reads only: it needs no lease and may run beside a
render (a row committed meanwhile is checked or not).

At scale the audit is sharded: the claimed rows (``output.audit.Claimed``: the checkpoint's ids
and a listing of the markers, each once, spilled to local disk by id hash) are cut into shards
of ``SHARD`` ids, each judged as an independent task through the executor seam
(``Executor.map_tasks``: Ray tasks anywhere on the cluster, or threads here), with a progress
line every ``PROGRESS_EVERY_S``. ``--sample N`` judges N claimed rows drawn uniformly without
replacement (seeded: ``--seed`` draws the same rows again) and reports what it sampled and the
upper bound (95%) on the broken fraction of the whole output that what it found allows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from klein_ray.commands.currency import Judged, judge_rows
from klein_ray.commands.render import executor_factory
from klein_ray.config import ConfigError, StorageConfig
from klein_ray.executors.base import Executor
from klein_ray.intake.marks import OUTDATED, STALE
from klein_ray.output.audit import SHARD, AuditReport, Claimed, broken_bound
from klein_ray.output.joblog import read_config, read_state
from klein_ray.output.ledger import Ledger, Verdict
from klein_ray.storage import open_store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
IN_FLIGHT = 8  # shards judged at once (each judges 16 rows at a time)


@dataclass(frozen=True)
class Shard:
    """One task of a sharded verify: where the output is, and the ids to judge."""

    uri: str
    storage: StorageConfig
    ids: list[str]
    deep: bool


@dataclass
class ShardResult:
    checked: int
    broken: list[Verdict] = field(default_factory=list)


def shard_executor(kind: str, address: str | None, join_timeout: float) -> Executor:
    """Where shards are judged: ``ray`` (tasks on the cluster), ``local`` (threads here), or
    ``auto``: Ray when ``address`` or ``RAY_ADDRESS`` names a cluster, else local."""
    if kind == "auto":
        kind = "ray" if address or os.environ.get("RAY_ADDRESS") else "local"
    return executor_factory(kind, address if kind == "ray" else None, join_timeout)()


def judge_shard(shard: Shard) -> ShardResult:
    """Judge a shard's rows by the ledger's predicate (a module-level function: Ray ships it by
    reference, and every node has klein_ray)."""
    ledger = Ledger(open_store(shard.uri, shard.storage))
    broken = [v for _, v in ledger.judge_all(shard.ids, shard.deep) if isinstance(v, Verdict)]
    return ShardResult(len(shard.ids), broken)


STALE_LINE = "stale: its manifest row changed since it was rendered (render renders it again)"
OUTDATED_LINE = ("outdated: rendered under another setup of its variant (render --rerender-outdated "
                 "renders it again)")


@dataclass
class Verification:
    report: AuditReport
    current: Judged | None = None  # the manifest's rows' standing (None: manifest unreadable)

    @property
    def stale(self) -> int:
        return self.current.marks.count(STALE) if self.current else 0

    @property
    def outdated(self) -> int:
        return self.current.marks.count(OUTDATED) if self.current else 0

    def lines(self) -> Iterator[str]:
        """Each broken row, then each stale and each outdated one, streamed from the manifest."""
        yield from (f"{v.id}\t{v.problem}" for v in self.report.broken)
        if self.current is not None:
            yield from (f"{i}\t{STALE_LINE}" for i in self.current.ids(STALE))
            yield from (f"{i}\t{OUTDATED_LINE}" for i in self.current.ids(OUTDATED))

    def as_dict(self) -> dict:
        return dict(self.report.as_dict(), stale=self.stale, outdated=self.outdated)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


def verify_output(uri: str, deep: bool = False, storage: StorageConfig | None = None,
                  executor: Executor | None = None, sample: int | None = None, seed: int = 0,
                  tmp_dir: str | None = None) -> Verification:
    """The audit of the output at ``uri`` (every claimed row, or a ``sample`` of them), sharded
    through ``executor`` (None: judged here), and how current its rows are."""
    if sample is not None and sample < 1:
        raise ConfigError("--sample N: N must be at least 1")
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    state = read_state(ledger.store) or {}
    report = AuditReport(deep=deep)
    with Claimed(ledger, int(state.get("total") or 0), tmp_dir) as claimed:
        if sample is not None:
            ids = claimed.sample(sample, seed)
            shards: Iterator[list[str]] = (ids[at:at + SHARD] for at in range(0, len(ids), SHARD))
            population = len(claimed)
        else:
            shards = claimed.chunks(SHARD)
            population = len(claimed)
        _judge(report, shards, uri, storage, deep, executor, population if sample is None else len(ids))
    if sample is not None:
        bound = broken_bound(len(report.broken), report.checked)
        report.sample = {
            "sampled": report.checked, "population": population, "seed": seed,
            "method": "uniform without replacement over the claimed rows (the checkpoint's ids and "
                      "every marker, each once)",
            "broken_fraction_upper_95": round(bound, 6),
        }
    return Verification(report, judge_rows(state, ledger, storage, read_config(ledger.store), tmp_dir))


def _judge(report: AuditReport, shards: Iterator[list[str]], uri: str, storage: StorageConfig, deep: bool,
           executor: Executor | None, total: int) -> None:
    tasks = (Shard(uri, storage, ids, deep) for ids in shards)
    results = executor.map_tasks(judge_shard, tasks, IN_FLIGHT, 0.5) if executor else map(judge_shard, tasks)
    told = time.monotonic()
    for result in results:
        report.checked += result.checked
        report.broken.extend(result.broken)
        if time.monotonic() - told >= PROGRESS_EVERY_S:
            told = time.monotonic()
            log.info("verify: %d of %d rows checked, %d broken", report.checked, total, len(report.broken))
    report.broken.sort(key=lambda v: v.id)

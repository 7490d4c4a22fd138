"""Auditing an output against the ledger's predicate: which rows that claim to be committed are
not (``klein-ray verify``, ``render --verify``), and how many rows are (``klein-ray status``).

A row claims to be committed when the checkpoint names it or its marker exists. Each such row is
judged by the ledger (``Ledger.judge``, the one predicate): marker readable and the row's own,
naming the row's image, stored with the size and sha256 the marker names; ``deep`` downloads
every image and hashes it (a shallow check trusts the sha256 an image carries in its metadata,
which a tool writing behind our back does not update). Read-only: auditing needs no lease and
writes nothing.

The claimed rows (``Claimed``) are the checkpoint's ids and a listing of ``meta/``, each id once:
both are spilled to local disk partitioned by a hash of the id and deduplicated one partition at
a time (exact: the strings are compared), so an audit of 100 million rows holds one partition.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from klein_ray.output.checkpoint import DoneSet, retrying
from klein_ray.output.ledger import CommittedRow, Ledger, Verdict
from klein_ray.storage.spill import Spill, exact_groups, partitions_for, string_hashes

log = logging.getLogger(__name__)

Depth = str  # "shallow" (trust the sha256 an image carries) or "deep" (hash its bytes)
SHARD = 10_000  # ids judged per shard (a task of a sharded verify)
_IDS = pa.schema([("id", pa.string()), ("hash", pa.uint64())])


@dataclass
class AuditReport:
    checked: int = 0
    deep: bool = False
    broken: list[Verdict] = field(default_factory=list)  # in id order
    sample: dict | None = None  # what a sampled audit sampled, how, and the bound it gives

    @property
    def repairs(self) -> dict[str, str]:
        """Broken row id -> the marker version judged broken (for ``Ledger.commit(repair=)``)."""
        return {v.id: v.marker_version for v in self.broken}

    def as_dict(self) -> dict:
        found = {"checked": self.checked, "broken": len(self.broken), "deep": self.deep}
        return dict(found, sample=self.sample) if self.sample is not None else found


@dataclass(frozen=True)
class Census:
    """Rows an output holds, by the predicate: committed ids, and markers that commit nothing."""

    committed: set[str]
    unreadable: int  # marker objects outside the checkpoint that commit nothing
    how: str  # how the rows outside the checkpoint were found


class Claimed:
    """Every id the checkpoint or a marker says is committed, each once, partitioned by a hash
    of the id (``rows_hint``: about how many, to size the partitions). Use as a context manager."""

    def __init__(self, ledger: Ledger, rows_hint: int = 0, tmp_dir: str | None = None):
        parts = partitions_for(2 * max(rows_hint, ledger.checkpoint.count()))
        self._spill = Spill(_IDS, parts, tmp_dir)

        def anew() -> None:  # a part vanished midway (merged by a render): read them again
            self._spill.close()
            self._spill = Spill(_IDS, parts, tmp_dir)
        for chunk in retrying(lambda: ledger.checkpoint.scan(["id"]), anew):
            self._add(chunk.table.column("id").combine_chunks())
        page: list[str] = []
        for row_id in ledger.marker_ids():
            page.append(row_id)
            if len(page) >= 65536:
                self._add(pa.array(page, pa.string()))
                page = []
        self._add(pa.array(page, pa.string()))
        self._sizes = [len(part) for part in self._parts()]

    def _add(self, ids: pa.Array) -> None:
        ids = ids.filter(pc.is_valid(ids)) if ids.null_count else ids
        if len(ids):
            hashes = string_hashes(ids)
            self._spill.add(pa.record_batch([ids, pa.array(hashes)], schema=_IDS), hashes)

    def _parts(self) -> Iterator[pa.Array]:
        for part in self._spill.parts():
            ids = part.column("id").combine_chunks()
            if not len(ids):
                yield pa.array([], pa.string())
                continue
            order, starts = exact_groups(ids, np.asarray(part.column("hash")))
            yield ids.take(pa.array(order[starts]))

    def __len__(self) -> int:
        return sum(self._sizes)

    def chunks(self, size: int = SHARD) -> Iterator[list[str]]:
        """Every claimed id, in lists of at most ``size``."""
        for ids in self._parts():
            for at in range(0, len(ids), size):
                yield ids.slice(at, size).to_pylist()

    def sample(self, n: int, seed: int) -> list[str]:
        """``n`` claimed ids drawn uniformly without replacement (``seed``: the same draw again)."""
        picks = sorted(random.Random(seed).sample(range(len(self)), min(n, len(self))))
        found: list[str] = []
        at, p = 0, 0
        for ids in self._parts():
            mine = [i - at for i in picks[p:] if i < at + len(ids)]
            found.extend(ids.take(pa.array(mine, pa.int64())).to_pylist() if mine else [])
            p += len(mine)
            at += len(ids)
        return found

    def close(self) -> None:
        self._spill.close()

    def __enter__(self) -> Claimed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def claimed(ledger: Ledger) -> list[str]:
    """Every id the checkpoint or a marker says is committed, sorted (small outputs)."""
    with Claimed(ledger) as found:
        return sorted(i for chunk in found.chunks() for i in chunk)


def audit(ledger: Ledger, deep: bool = False, ids: list[str] | None = None,
          tmp_dir: str | None = None) -> AuditReport:
    """Judge every claimed row (or ``ids``), in parallel, a shard at a time; broken rows in id
    order."""
    report = AuditReport(deep=deep)
    if ids is not None:
        shards: Iterator[list[str]] = iter([ids])
        found = None
    else:
        found = Claimed(ledger, tmp_dir=tmp_dir)
        shards = found.chunks()
    try:
        for shard in shards:
            report.checked += len(shard)
            report.broken.extend(v for _, v in ledger.judge_all(shard, deep) if isinstance(v, Verdict))
    finally:
        if found is not None:
            found.close()
    report.broken.sort(key=lambda v: v.id)
    return report


def broken_rows(ledger: Ledger, depth: Depth, tmp_dir: str | None = None) -> dict[str, str]:
    """``render --verify`` (``depth`` "shallow" or "deep"): the committed rows that are broken,
    logged (the first 20 with their problem), to be rendered again and repaired."""
    report = audit(ledger, deep=depth == "deep", tmp_dir=tmp_dir)
    for damage in report.broken[:20]:
        log.warning("verify: %s: %s", damage.id, damage.problem)
    log.info("verify: %d committed rows checked (%s), %d broken: rendering them again",
             report.checked, depth, len(report.broken))
    return report.repairs


def broken_bound(broken: int, sampled: int, confidence: float = 0.95) -> float:
    """The one-sided upper confidence bound on the broken fraction of the whole output, from
    ``broken`` of ``sampled`` rows drawn uniformly (Clopper-Pearson, exact: conservative for a
    draw without replacement)."""
    if sampled == 0:
        return 1.0
    if broken >= sampled:
        return 1.0
    lo, hi = broken / sampled, 1.0
    for _ in range(60):  # the p at which seeing at most `broken` is 1 - confidence likely
        mid = (lo + hi) / 2
        if _binom_cdf(broken, sampled, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0 if k < n else 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def census(ledger: Ledger, lookups: Collection[str] | None, done: DoneSet | None = None,
           judge_checkpointed: bool = False) -> Census:
    """Committed rows of a small output: the checkpoint (``done``, read if not given) names
    most; the rows outside it are judged one by one, either the ids in ``lookups`` (when the
    caller knows them and they are few) or every marker the checkpoint does not name (found by
    listing ``meta/``: a request per 1,000). A damaged checkpoint part means a listing, whatever
    ``lookups`` says: its rows are not in the checkpoint any more. ``judge_checkpointed``: judge
    the rows the checkpoint names too (exact whatever happened to their markers since they
    were committed: a GET and a HEAD each)."""
    checkpointed = set(ledger.done() if done is None else done)
    committed = set() if judge_checkpointed else set(checkpointed)
    if lookups is None or ledger.checkpoint.damaged:
        candidates = sorted(i for i in ledger.marker_ids() if i not in committed)
        how = "a listing of every marker"
    else:
        candidates = sorted((set(lookups) | (checkpointed if judge_checkpointed else set())) - committed)
        how = f"{len(candidates)} marker lookups"
    how = ("every row judged: " if judge_checkpointed else "checkpoint + ") + how
    unreadable = 0
    for row_id, verdict in ledger.judge_all(candidates):
        if isinstance(verdict, CommittedRow):
            committed.add(row_id)
        elif verdict.present:
            unreadable += 1
    return Census(committed, unreadable, how)

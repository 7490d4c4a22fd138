"""Auditing an output against the ledger's predicate: which rows that claim to be committed are
not (``klein-ray verify``, ``render --verify``), and how many rows are (``klein-ray status``).

A row claims to be committed when the checkpoint names it or its marker exists. Each such row is
judged by the ledger (``Ledger.judge``, the one predicate): marker readable and the row's own,
naming the row's image, stored with the size and sha256 the marker names; ``deep`` downloads
every image and hashes it (a shallow check trusts the sha256 an image carries in its metadata,
which a tool writing behind our back does not update). Read-only: auditing needs no lease and
writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from klein_ray.output.checkpoint import DoneSet
from klein_ray.output.ledger import CommittedRow, Ledger, Verdict

log = logging.getLogger(__name__)

Depth = str  # "shallow" (trust the sha256 an image carries) or "deep" (hash its bytes)


@dataclass
class AuditReport:
    checked: int = 0
    deep: bool = False
    broken: list[Verdict] = field(default_factory=list)  # in id order

    @property
    def repairs(self) -> dict[str, str]:
        """Broken row id -> the marker version judged broken (for ``Ledger.commit(repair=)``)."""
        return {v.id: v.marker_version for v in self.broken}

    def as_dict(self) -> dict:
        return {"checked": self.checked, "broken": len(self.broken), "deep": self.deep}


@dataclass(frozen=True)
class Census:
    """Rows an output holds, by the predicate: committed ids, and markers that commit nothing."""

    committed: set[str]
    unreadable: int  # marker objects outside the checkpoint that commit nothing
    how: str  # how the rows outside the checkpoint were found


def claimed(ledger: Ledger) -> list[str]:
    """Every id the checkpoint or a marker says is committed, sorted."""
    return sorted(set(ledger.done()) | set(ledger.marker_ids()))


def audit(ledger: Ledger, deep: bool = False, ids: list[str] | None = None) -> AuditReport:
    """Judge every claimed row (or ``ids``), in parallel; broken rows in id order."""
    ids = claimed(ledger) if ids is None else ids
    report = AuditReport(checked=len(ids), deep=deep)
    for _, verdict in ledger.judge_all(ids, deep):
        if isinstance(verdict, Verdict):
            report.broken.append(verdict)
    return report


def broken_rows(ledger: Ledger, depth: Depth) -> dict[str, str]:
    """``render --verify`` (``depth`` "shallow" or "deep"): the committed rows that are broken,
    logged (the first 20 with their problem), to be rendered again and repaired."""
    report = audit(ledger, deep=depth == "deep")
    for damage in report.broken[:20]:
        log.warning("verify: %s: %s", damage.id, damage.problem)
    log.info("verify: %d committed rows checked (%s), %d broken: rendering them again",
             report.checked, depth, len(report.broken))
    return report.repairs


def census(ledger: Ledger, lookups: Collection[str] | None, done: DoneSet | None = None,
           judge_checkpointed: bool = False) -> Census:
    """Committed rows, cheaply: the checkpoint (``done``, read if not given) names most; the
    rows outside it are judged one by one, either the ids in ``lookups`` (when the caller knows
    them and they are few) or every marker the checkpoint does not name (found by listing
    ``meta/``: a request per 1,000). A damaged checkpoint part means a listing, whatever
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

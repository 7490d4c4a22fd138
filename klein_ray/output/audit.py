"""Auditing an output: which rows that claim to be committed are not (``klein-ray verify``).

A row claims to be committed when the checkpoint names it or its marker exists. Each such row is
checked by the ledger (``Ledger.audit``): marker readable and naming an image, the image there
with the size and sha256 the marker names; ``deep`` downloads every image and hashes it (a
shallow check trusts the sha256 an image carries in its metadata, which a tool writing behind
our back does not update). Read-only: auditing needs no lease and writes nothing.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from klein_ray.output.ledger import Ledger

log = logging.getLogger(__name__)

THREADS = 16  # requests in flight (each row is one GET and one HEAD, or two GETs deep)


@dataclass(frozen=True)
class Damage:
    """One row that claims to be committed and is not."""

    id: str
    problem: str
    marker_version: str = ""  # the marker's etag as judged ('' if none): what a repair replaces


@dataclass
class AuditReport:
    checked: int = 0
    deep: bool = False
    broken: list[Damage] = field(default_factory=list)

    @property
    def repairs(self) -> dict[str, str]:
        """Broken row id -> the marker version judged broken (for ``Ledger.commit(repair=)``)."""
        return {d.id: d.marker_version for d in self.broken}

    def as_dict(self) -> dict:
        return {"checked": self.checked, "broken": len(self.broken), "deep": self.deep}


def claimed(ledger: Ledger) -> list[str]:
    """Every id the checkpoint or a marker says is committed, sorted."""
    return sorted(set(ledger.done()) | ledger.committed_ids())


def audit(ledger: Ledger, deep: bool = False, ids: list[str] | None = None) -> AuditReport:
    """Check every claimed row (or ``ids``), in parallel; damages in id order."""
    ids = claimed(ledger) if ids is None else ids
    report = AuditReport(checked=len(ids), deep=deep)
    for row_id, (problem, version) in _audit_all(ledger, ids, deep):
        if problem is not None:
            report.broken.append(Damage(row_id, problem, version))
    return report


def _audit_all(ledger: Ledger, ids: list[str], deep: bool) -> Iterator[tuple[str, tuple[str | None, str]]]:
    with ThreadPoolExecutor(THREADS, thread_name_prefix="klein-ray-audit") as pool:
        yield from zip(ids, pool.map(lambda i: ledger.audit_version(i, deep), ids))


def broken_rows(ledger: Ledger, mode: str) -> dict[str, str]:
    """``render --verify`` (``mode`` "shallow" or "deep"): the committed rows that are broken,
    logged (the first 20 with their problem), to be rendered again and repaired."""
    report = audit(ledger, deep=mode == "deep")
    for damage in report.broken[:20]:
        log.warning("verify: %s: %s", damage.id, damage.problem)
    log.info("verify: %d committed rows checked (%s), %d broken: rendering them again",
             report.checked, mode, len(report.broken))
    return report.repairs

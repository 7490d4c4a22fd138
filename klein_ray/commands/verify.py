"""`klein-ray verify OUT [--deep]`: audit every committed row; exit 0 if all sound, 1 if not.

Prints one line per broken row (``id<TAB>problem``), then one per committed row that is stale
or outdated against the job's manifest as it is now (reported, not broken: ``render`` renders
stale rows again), and a JSON summary last. Reads only: it needs no lease and may run beside a
render (a row committed meanwhile is checked or not).
"""

from __future__ import annotations

from dataclasses import dataclass

from klein_ray.commands.currency import Currency, currency
from klein_ray.config import StorageConfig
from klein_ray.output.audit import AuditReport, audit
from klein_ray.output.joblog import read_config, read_state
from klein_ray.output.ledger import Ledger
from klein_ray.storage import open_store


@dataclass
class Verification:
    report: AuditReport
    current: Currency

    def lines(self) -> list[str]:
        return ([f"{v.id}\t{v.problem}" for v in self.report.broken]
                + [f"{i}\tstale: its manifest row changed since it was rendered (render renders it again)"
                   for i in self.current.stale]
                + [f"{i}\toutdated: rendered under another setup of its variant (render "
                   "--rerender-outdated renders it again)" for i in self.current.outdated])

    def as_dict(self) -> dict:
        return dict(self.report.as_dict(), stale=len(self.current.stale), outdated=len(self.current.outdated))


def verify_output(uri: str, deep: bool = False, storage: StorageConfig | None = None) -> Verification:
    """The audit of the output at ``uri``, and how current its rows are."""
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    report = audit(ledger, deep=deep)
    return Verification(report, currency(read_state(ledger.store) or {}, ledger.done(), storage,
                                          read_config(ledger.store)))

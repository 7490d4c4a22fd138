"""`klein-ray verify OUT [--deep]`: audit every committed row; exit 0 if all sound, 1 if not.

Prints one line per broken row (``id<TAB>problem``) and a JSON summary last. Reads only: it
needs no lease and may run beside a render (a row committed meanwhile is checked or not).
"""

from __future__ import annotations

from klein_ray.config import StorageConfig
from klein_ray.output.audit import AuditReport, audit
from klein_ray.output.ledger import Ledger
from klein_ray.storage import open_store


def verify_output(uri: str, deep: bool = False, storage: StorageConfig | None = None) -> AuditReport:
    """The audit of the output at ``uri``."""
    store = open_store(uri, storage or StorageConfig())
    return audit(Ledger(store), deep=deep)

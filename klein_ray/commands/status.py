"""`klein-ray status OUT`: committed / failed / remaining counts from storage alone (no Ray).

Committed means a readable marker of a row of the job's manifest. Markers of ids the manifest
does not have (an output reused with another manifest, a file copied in) are counted apart as
``foreign``, and markers that are not valid JSON naming an image as ``unreadable``: neither is a
committed row of this job. The checkpoint names most committed rows; only markers it does not
name (written since its last part) are read; ``verify`` checks every row in full. A running
job's ``_job/progress.json`` is shown too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from klein_ray.config import StorageConfig
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.output.audit import census
from klein_ray.output.joblog import read_errors, read_progress, read_state
from klein_ray.output.ledger import Ledger
from klein_ray.storage import StorageError, open_store

LOOKUP_LIMIT = 2000  # rows outside the checkpoint looked up one by one; more: list the markers


@dataclass(frozen=True)
class OutputStatus:
    committed: int
    failed: int
    remaining: int | None  # None when no job has recorded the manifest's size yet
    total: int | None
    manifest: str | None
    foreign: int | None = 0  # markers of ids outside the manifest (None: manifest unreadable)
    unreadable: int = 0  # markers that commit nothing
    progress: dict | None = None  # the latest run's _job/progress.json (state "running" while it runs)
    requests: str = ""  # how the counts were made: from the checkpoint, or a listing of markers

    def counts(self) -> dict:
        return {"committed": self.committed, "failed": self.failed, "remaining": self.remaining,
                "foreign": self.foreign, "unreadable": self.unreadable}

    def as_dict(self) -> dict:
        return asdict(self)


def output_status(uri: str, storage: StorageConfig | None = None) -> OutputStatus:
    """Exact counts, cheaply: the checkpoint names most committed rows; only rows it does not
    name are judged by the ledger's predicate, looked up one by one when they are few, else
    found by listing every marker (one request per 1,000)."""
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    state = read_state(ledger.store) or {}
    manifest_ids = _manifest_ids(state.get("manifest"), storage)
    outside = manifest_ids - set(ledger.done()) if manifest_ids is not None else None
    found = census(ledger, outside if outside is not None and len(outside) <= LOOKUP_LIMIT else None)
    foreign = found.committed - manifest_ids if manifest_ids is not None else set()
    committed = found.committed - foreign
    failed = _failed_rows(ledger, committed)
    total = state.get("total")
    remaining = max(0, total - len(committed) - failed) if total is not None else None
    return OutputStatus(len(committed), failed, remaining, total, state.get("manifest"),
                        len(foreign) if manifest_ids is not None else None, found.unreadable,
                        read_progress(ledger.store), found.how)


def _failed_rows(ledger: Ledger, committed: set[str]) -> int:
    """Rows the latest run recorded as failed and that are not committed since. Counted as
    rows, not ids: rows sharing a duplicate id each failed."""
    errors = read_errors(ledger.store)
    if errors is None:
        return 0
    rows = {(e["manifest_file"], e["manifest_row"])
            for e in errors.select(["id", "manifest_file", "manifest_row"]).to_pylist()
            if e["id"] not in committed}
    return len(rows)


def _manifest_ids(uri: str | None, storage: StorageConfig) -> set[str] | None:
    """The job's manifest ids (the id column only), or None when it cannot be read from here."""
    if not uri:
        return None
    try:
        with Manifest(uri, storage) as manifest:
            ids: set[str] = set()
            for batch in manifest.iter_batches(["id"]):
                ids.update(i for i in batch.column("id").to_pylist() if isinstance(i, str))
            return ids
    except (ManifestError, StorageError, OSError, ValueError):
        return None

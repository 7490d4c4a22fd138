"""`klein-ray status OUT`: committed / failed / remaining counts from storage alone (no Ray).

Committed means a readable marker of a row of the job's manifest. Markers of ids the manifest
does not have (an output reused with another manifest, a file copied in) are counted apart as
``foreign``, and markers that are not valid JSON naming an image as ``unreadable``: neither is a
committed row of this job. Only markers the checkpoint does not name yet (written since its
last part) are read to find unreadable ones; ``verify`` checks every row in full.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from klein_ray.config import StorageConfig
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.output.joblog import read_errors, read_state
from klein_ray.output.ledger import Ledger
from klein_ray.storage import StorageError, open_store


@dataclass(frozen=True)
class OutputStatus:
    committed: int
    failed: int
    remaining: int | None  # None when no job has recorded the manifest's size yet
    total: int | None
    manifest: str | None
    foreign: int | None = 0  # markers of ids outside the manifest (None: manifest unreadable)
    unreadable: int = 0  # markers that commit nothing

    def counts(self) -> dict:
        return {"committed": self.committed, "failed": self.failed, "remaining": self.remaining,
                "foreign": self.foreign, "unreadable": self.unreadable}

    def as_dict(self) -> dict:
        return asdict(self)


def output_status(uri: str, storage: StorageConfig | None = None) -> OutputStatus:
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    markers = ledger.committed_ids()
    checkpointed = set(ledger.done())
    unreadable = {i for i in markers - checkpointed if ledger.read_meta(i) is None}
    committed = markers - unreadable
    state = read_state(ledger.store) or {}
    manifest_ids = _manifest_ids(state.get("manifest"), storage)
    foreign = committed - manifest_ids if manifest_ids is not None else set()
    committed -= foreign
    failed = _failed_rows(ledger, committed)
    total = state.get("total")
    remaining = max(0, total - len(committed) - failed) if total is not None else None
    return OutputStatus(len(committed), failed, remaining, total, state.get("manifest"),
                        len(foreign) if manifest_ids is not None else None, len(unreadable))


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

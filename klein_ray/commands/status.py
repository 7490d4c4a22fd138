"""`klein-ray status OUT`: committed / failed / remaining counts from storage alone (no Ray)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from klein_ray.config import StorageConfig
from klein_ray.output.joblog import read_errors, read_state
from klein_ray.output.ledger import Ledger
from klein_ray.storage import open_store


@dataclass(frozen=True)
class OutputStatus:
    committed: int
    failed: int
    remaining: int | None  # None when no job has recorded the manifest's size yet
    total: int | None
    manifest: str | None

    def counts(self) -> dict:
        return {"committed": self.committed, "failed": self.failed, "remaining": self.remaining}

    def as_dict(self) -> dict:
        return asdict(self)


def output_status(uri: str, storage: StorageConfig | None = None) -> OutputStatus:
    store = open_store(uri, storage or StorageConfig())
    committed_ids = Ledger(store).committed_ids()
    errors = read_errors(store)
    # Count failed rows, not ids: rows sharing a duplicate id each failed.
    failed_rows = set()
    if errors is not None:
        for e in errors.select(["id", "manifest_file", "manifest_row"]).to_pylist():
            if e["id"] not in committed_ids:
                failed_rows.add((e["manifest_file"], e["manifest_row"]))
    state = read_state(store) or {}
    total = state.get("total")
    remaining = max(0, total - len(committed_ids) - len(failed_rows)) if total is not None else None
    return OutputStatus(len(committed_ids), len(failed_rows), remaining, total, state.get("manifest"))

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

from klein_ray.commands.currency import currency
from klein_ray.config import StorageConfig
from klein_ray.output.audit import census
from klein_ray.output.joblog import read_config, read_errors, read_progress, read_state
from klein_ray.output.lease import holder_gone
from klein_ray.output.ledger import Ledger
from klein_ray.storage import open_store

LOOKUP_LIMIT = 2000  # rows outside the checkpoint looked up one by one; more: list the markers
JUDGE_LIMIT = 2000  # an output of at most this many rows is judged row by row, checkpointed ones too


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
    stale: int = 0  # committed rows whose manifest row changed since (the next run renders them)
    outdated: int = 0  # committed under another setup of their variant (kept unless asked)

    def counts(self) -> dict:
        return {"committed": self.committed, "failed": self.failed, "remaining": self.remaining,
                "foreign": self.foreign, "unreadable": self.unreadable, "stale": self.stale,
                "outdated": self.outdated}

    def as_dict(self) -> dict:
        return asdict(self)


def output_status(uri: str, storage: StorageConfig | None = None) -> OutputStatus:
    """Exact counts, cheaply: the checkpoint names most committed rows; only rows it does not
    name are judged by the ledger's predicate, looked up one by one when they are few, else
    found by listing every marker (one request per 1,000)."""
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    state = read_state(ledger.store) or {}
    done = ledger.done()
    current = currency(state, done, storage, read_config(ledger.store))
    manifest_ids = current.ids
    outside = manifest_ids - set(done) if manifest_ids is not None else None
    few = outside is not None and len(outside) <= LOOKUP_LIMIT
    # A small output is judged row by row, markers of checkpointed rows included (a marker
    # swapped or removed behind the checkpoint's back then counts as it is); a large one
    # trusts its checkpoint for the rows it names (`verify` judges every row).
    exact = few and len(done) + len(outside or ()) <= JUDGE_LIMIT
    found = census(ledger, outside if few else None, done, judge_checkpointed=exact)
    foreign = found.committed - manifest_ids if manifest_ids is not None else set()
    committed = found.committed - foreign
    failed = _failed_rows(ledger, committed)
    total = state.get("total")
    # Stale rows are rendered again by the next run: not done, though committed.
    remaining = max(0, total - len(committed) + len(current.stale) - failed) if total is not None else None
    return OutputStatus(len(committed), failed, remaining, total, state.get("manifest"),
                        len(foreign) if manifest_ids is not None else None, found.unreadable,
                        _progress(ledger.store), found.how, len(current.stale), len(current.outdated))


def _progress(store) -> dict | None:
    """The latest run's progress, its state corrected when the run is not running any more
    although its last word said so (killed, or its machine gone): "interrupted", with why."""
    progress = read_progress(store)
    if progress and progress.get("state") in ("running", "loading"):
        gone = holder_gone(store, str(progress.get("run_id")))
        if gone:
            progress = dict(progress, state="interrupted", why=gone)
    return progress


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

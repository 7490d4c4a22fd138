"""`klein-ray status OUT`: committed / failed / remaining counts from storage alone (no Ray).

Committed means a readable marker of a row of the job's manifest. Markers of ids the manifest
does not have (an output reused with another manifest, a file copied in) are counted apart as
``foreign``, and markers that are not valid JSON naming an image as ``unreadable``: neither is a
committed row of this job. The checkpoint names most committed rows; only markers it does not
name (written since its last part) are read; ``verify`` checks every row in full. A running
job's ``_job/progress.json`` is shown too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from klein_ray.commands.currency import Judged, currency, judged
from klein_ray.config import StorageConfig
from klein_ray.intake.marks import DONE, FAILED, OUTDATED, STALE, STANDING
from klein_ray.output.audit import census
from klein_ray.output.checkpoint import retrying
from klein_ray.output.joblog import error_batches, read_config, read_errors, read_progress, read_state
from klein_ray.output.lease import holder_gone
from klein_ray.output.ledger import CommittedRow, Ledger, Verdict
from klein_ray.storage import open_store
from klein_ray.storage.spill import Spill, partitions_for, string_hashes

LOOKUP_LIMIT = 2000  # rows outside the checkpoint looked up one by one; more: list the markers
JUDGE_LIMIT = 2000  # an output of at most this many rows is judged row by row, checkpointed ones too
LIST_LIMIT = 1_000_000  # a larger output lists its markers only when asked (`status --markers`)


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


def output_status(uri: str, storage: StorageConfig | None = None, markers: bool = False,
                  tmp_dir: str | None = None) -> OutputStatus:
    """Counts, cheaply: the checkpoint names most committed rows; only rows it does not name
    are judged by the ledger's predicate, looked up one by one when they are few, else found by
    listing every marker (one request per 1,000) when the output has at most ``LIST_LIMIT`` rows
    or ``markers`` asks. A large output is counted a byte per row (``status_at_scale``)."""
    storage = storage or StorageConfig()
    ledger = Ledger(open_store(uri, storage))
    state = read_state(ledger.store) or {}
    if ledger.checkpoint.count() + int(state.get("total") or 0) > JUDGE_LIMIT:
        with judged(state, ledger, storage, read_config(ledger.store), tmp_dir) as found:
            if found is not None:
                return status_at_scale(ledger, state, found, markers, tmp_dir)
    return _small_status(ledger, state, storage)


def _small_status(ledger: Ledger, state: dict, storage: StorageConfig) -> OutputStatus:
    """Exact counts of a small output (or one whose manifest cannot be read): ids in sets."""
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


# -- at scale: a byte per manifest row, never a string per row ---------------------------------

def status_at_scale(ledger: Ledger, state: dict, found: Judged, markers: bool = False,
                    tmp_dir: str | None = None) -> OutputStatus:
    """The counts of a large output from the rows' marks (``scheduling.standing``): the
    checkpoint's records by position (or by id where the manifest changed); the rows it does
    not name looked up one by one when few, else found by a listing of every marker when the
    output has at most LIST_LIMIT rows or ``markers`` asks, else not looked up (said so)."""
    marks, manifest = found.marks, found.manifest
    committed, unreadable, foreign = found.standing.committed, 0, found.standing.foreign
    outside = manifest.total_rows - committed
    if outside <= LOOKUP_LIMIT:
        looked = 0
        for index, rows, ids in list(_unmarked(found)):
            hits, bad = _judge(ledger, ids.to_pylist())
            marks.set(index, rows[np.array(hits, bool)], DONE)
            committed, unreadable, looked = committed + sum(hits), unreadable + bad, looked + len(rows)
        how = f"checkpoint + {looked} marker lookups"
    elif markers or manifest.total_rows <= LIST_LIMIT:
        more, unreadable, strays = _listing(ledger, found, tmp_dir)
        committed, foreign = committed + more, foreign + strays
        how = "checkpoint + a listing of every marker"
    else:
        how = (f"checkpoint only: {outside} rows it does not name were not looked up "
               "(`status --markers` lists every marker)")
    if found.standing.damaged:
        how += f"; {len(found.standing.damaged)} damaged checkpoint part(s) skipped"
    failed = _failed_marked(ledger, found)
    stale, outdated = marks.count(STALE), marks.count(OUTDATED)
    total = state.get("total")
    remaining = max(0, total - committed + stale - failed) if total is not None else None
    return OutputStatus(committed, failed, remaining, total, state.get("manifest"), foreign, unreadable,
                        _progress(ledger.store), how, stale, outdated)


def _unmarked(found: Judged) -> Iterator[tuple[int, np.ndarray, pa.Array]]:
    """(file index, rows, their ids) of the manifest rows the checkpoint does not name, a
    batch at a time (rows with a null id left out: no marker can be theirs)."""
    marks = found.marks

    def wanted(index: int, start: int, n: int) -> bool:
        return bool(np.any((marks.slice(index, start, n) & STANDING) == 0))

    for index, _, start, batch in found.manifest.iter_record_batches(["id"], 65536, wanted):
        rows = np.flatnonzero((marks.slice(index, start, batch.num_rows) & STANDING) == 0)
        if len(rows) and batch.num_columns:
            ids = batch.column(0).take(pa.array(rows)).cast(pa.string())
            valid = np.asarray(ids.is_valid())
            yield index, start + rows[valid], ids.filter(pa.array(valid))


def _judge(ledger: Ledger, ids: list[str]) -> tuple[list[bool], int]:
    """Whether each id is committed, by its marker; and how many markers commit nothing."""
    hits, unreadable = [], 0
    for _, verdict in ledger.judge_all(ids):
        hits.append(isinstance(verdict, CommittedRow))
        unreadable += isinstance(verdict, Verdict) and verdict.present
    return hits, unreadable


_ID = pa.schema([("id", pa.string())])
_ROW = pa.schema([("id", pa.string()), ("file", pa.int32()), ("row", pa.int64())])


def _listing(ledger: Ledger, found: Judged, tmp_dir: str | None) -> tuple[int, int, int]:
    """Markers the checkpoint does not name, judged: (manifest rows they commit, markers that
    commit nothing, committed ids outside the manifest). Listed ids, the checkpoint's ids and the
    unnamed rows' ids are spilled by id hash and matched a partition at a time."""
    parts = partitions_for(found.manifest.total_rows + ledger.checkpoint.count())
    spills = {"named": Spill(_ID, parts, tmp_dir)}

    def anew() -> None:  # a part vanished midway (merged by a render): read them again
        spills["named"].close()
        spills["named"] = Spill(_ID, parts, tmp_dir)
    for chunk in retrying(lambda: ledger.checkpoint.scan(["id"]), anew):
        ids = chunk.table.column("id").combine_chunks()
        spills["named"].add(pa.record_batch([ids], schema=_ID), string_hashes(ids))
    with Spill(_ID, parts, tmp_dir) as listed, spills["named"] as named, Spill(_ROW, parts, tmp_dir) as rows:
        for ids in _pages(ledger.marker_ids()):
            listed.add(pa.record_batch([ids], schema=_ID), string_hashes(ids))
        for index, at, ids in _unmarked(found):
            rows.add(pa.record_batch([ids, pa.array(np.full(len(at), index, np.int32)), pa.array(at)],
                                     schema=_ROW), string_hashes(ids))
        committed = unreadable = strays = 0
        for p in range(parts):
            candidates = pc.unique(listed.part(p).column("id").combine_chunks())
            known = named.part(p).column("id").combine_chunks()
            candidates = candidates.filter(pc.invert(pc.is_in(candidates, value_set=known)))
            hits, bad = _judge(ledger, candidates.to_pylist())
            unreadable += bad
            good = pa.table({"id": candidates.filter(pa.array(hits, pa.bool_()))})
            matched = good.join(rows.part(p), "id", join_type="inner")
            files, at = np.asarray(matched.column("file")), np.asarray(matched.column("row"))
            for index in np.unique(files):
                found.marks.set(int(index), at[files == index], DONE)
            committed += matched.num_rows
            strays += good.num_rows - len(pc.unique(matched.column("id"))) if matched.num_rows else good.num_rows
    return committed, unreadable, strays


def _pages(ids: Iterator[str], size: int = 65536) -> Iterator[pa.Array]:
    page: list[str] = []
    for row_id in ids:
        page.append(row_id)
        if len(page) >= size:
            yield pa.array(page, pa.string())
            page = []
    if page:
        yield pa.array(page, pa.string())


def _failed_marked(ledger: Ledger, found: Judged) -> int:
    """Rows the latest run recorded as failed that are not committed: by manifest position,
    each row once (rows of files the manifest no longer has: each record)."""
    names = {f.name: i for i, f in enumerate(found.manifest.files)}
    marks, failed = found.marks, 0
    elsewhere: set[tuple[str | None, int]] = set()
    for table in error_batches(ledger.store, ["manifest_file", "manifest_row"]):
        files = pc.dictionary_encode(table.column("manifest_file").combine_chunks())
        codes = np.asarray(pc.fill_null(files.indices, -1))
        rows = np.asarray(pc.fill_null(table.column("manifest_row"), -1)).astype(np.int64)
        for code, name in enumerate([*files.dictionary.to_pylist(), None]):
            mine = rows[codes == (code if name is not None else -1)]
            index = names.get(name) if name is not None else None
            if index is None:
                elsewhere.update((name, int(r)) for r in mine)
                continue
            inside = (mine >= 0) & (mine < len(marks.files[index]))
            elsewhere.update((name, int(r)) for r in mine[~inside])
            mine = np.unique(mine[inside])
            new = mine[(marks.files[index][mine] & (STANDING | FAILED)) == 0]
            marks.set(index, new, FAILED)
            failed += len(new)
    return failed + len(elsewhere)

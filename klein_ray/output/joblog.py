"""The job log under ``OUT/_job/``: resolved config, state, results and errors tables, summary,
contact-sheet entries and ``report.html``. Written by the driver only; read by ``status``.

The results table is the ledger's checkpoint (``_job/results/``, see ``checkpoint.py``). Errors
of the run are one table, rewritten at the end of each run, since every run retries every row
that is not committed.

Damaged job files are not fatal: the readers here warn and go on as if the file were absent
(the state, the progress, the errors table), and a driver (``set_aside``) moves an unreadable
contact sheet to ``_job/damaged/`` and starts a new one.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import yaml

from klein_ray.config import JobConfig
from klein_ray.output import layout
from klein_ray.output.checkpoint import set_aside
from klein_ray.output.errors import ERRORS_SCHEMA, ErrorLog  # (ERRORS_SCHEMA: imported from here too)
from klein_ray.output.ledger import Ledger
from klein_ray.output.report import (
    MAX_CONTACT_ENTRIES,
    ContactEntry,
    build_report,
    entries_from_parquet_bytes,
    entries_to_parquet_bytes,
)
from klein_ray.output.review import group_value
from klein_ray.storage import NotFound, Store
from klein_ray.storage.tables import TableWriter, get_table, open_table
from klein_ray.types import RowError, RowResult
from klein_ray.uris import local_path, redact

log = logging.getLogger(__name__)

SCAN_VERSION = 1  # what a scan record means; another version's is scanned again


class JobLog:
    def __init__(self, store: Store, config: JobConfig, manifest_uri: str, run_id: str,
                 set_aside: bool = False):
        self.store = store
        self.set_aside = set_aside
        self.run_id = run_id
        self.config = config
        # Absolute, so that `status` run from elsewhere reads the same manifest.
        self.manifest_uri = manifest_uri if "://" in manifest_uri else str(local_path(manifest_uri))
        self.contact = self._load_contact()
        self._contact_ids = {e.id for e in self.contact}
        self._earlier = len(self.contact)  # entries of earlier runs: the first to make room

    def start(self, total_rows: int, setups: dict[str, str] | None = None, adapters: dict | None = None,
              sources: dict[str, str] | None = None) -> None:
        """The resolved config and the state: manifest, rows, run, and each variant's setup
        digest with the default variant (what `status` and `verify` judge rows against)."""
        cfg = self.config.model_dump(mode="json")
        self.store.put(layout.CONFIG, yaml.safe_dump(cfg, sort_keys=False).encode(),
                       content_type="application/yaml")
        self._put_json(layout.STATE, {"manifest": self.manifest_uri, "total": total_rows,
                                      "run_id": self.run_id, "started_at": _now(),
                                      "default_variant": self.config.default_variant,
                                      "setups": setups or {}, "adapters": adapters or {},
                                      "sources": {v: redact(s) for v, s in (sources or {}).items()}})

    def add_result(self, result: RowResult) -> None:
        """Keep images of the output for the contact sheet (thumbnails are small), at most
        MAX_CONTACT_ENTRIES: this run's before earlier runs' (a second pass of rejected shots
        is what its reviewer looks at), a row rendered again replacing its old entry."""
        if not result.thumbnail:
            return
        entry = ContactEntry(
            id=result.id, prompt=result.prompt, variant=result.variant, seed=result.seed,
            width=result.width, height=result.height,
            render_ms=1000 * result.timings.get("render", 0.0), image_key=result.image_key,
            thumbnail=result.thumbnail,
            reference_sha256=[sha for sha, _ in result.reference_thumbnails],
            reference_thumbnails=[thumb for _, thumb in result.reference_thumbnails],
        )
        if result.id in self._contact_ids:
            at = next(i for i, e in enumerate(self.contact) if e.id == result.id)
            self.contact[at] = entry
            return
        if len(self.contact) >= MAX_CONTACT_ENTRIES:
            if not self._earlier:
                return
            self._contact_ids.discard(self.contact.pop(0).id)
            self._earlier -= 1
        self.contact.append(entry)
        self._contact_ids.add(result.id)

    def finish(self, errors: ErrorLog | list[RowError], summary: dict, committed_total: int,
               noise_model: bool) -> None:
        """Write the errors table (streamed: a run may fail millions of rows), summary, contact
        entries and the report (in that order; the report lists the first errors)."""
        if isinstance(errors, list):
            log_ = ErrorLog(self.run_id)
            log_.extend(errors)
            errors = log_
        with TableWriter(self.store, layout.ERRORS, ERRORS_SCHEMA) as writer:
            for batch in errors.batches():
                writer.write(batch)
        self._put_json(layout.SUMMARY, summary)
        self.store.put(layout.CONTACT, entries_to_parquet_bytes(self.contact))
        group_by = self.config.report.group_by
        groups = group_values(self.store, [e.id for e in self.contact], group_by) if group_by else None
        if group_by and self.contact and not any((groups or {}).values()):
            log.warning("report.group_by: no image of the report has a %r column; the report is not "
                        "grouped", group_by)
            group_by = None
        html = build_report(dict(summary, run_id=self.run_id), self.contact, errors.first,
                            total_committed=committed_total, noise_model=noise_model,
                            group_by=group_by, groups=groups, errors_total=len(errors))
        self.store.put(layout.REPORT, html.encode(), content_type="text/html; charset=utf-8")

    # -- helpers ---------------------------------------------------------------------------

    def _load_contact(self) -> list[ContactEntry]:
        try:
            return entries_from_parquet_bytes(self.store.get(layout.CONTACT))
        except NotFound:
            return []
        except Exception as exc:  # noqa: BLE001 - any way the file fails to parse: it is damaged
            where = set_aside(self.store, layout.CONTACT) if self.set_aside else "its place"
            log.warning("%s cannot be read (%s): left in %s; the contact sheet starts anew",
                        layout.CONTACT, type(exc).__name__, where)
            return []

    def put_scan(self, files: list[list], duplicates: pa.Table) -> None:
        """What the prescan found (the rows whose id another row shares), keyed by the manifest's
        files as scanned whole: [relative name, content tag, rows] each. A run over the same
        bytes reads it instead of scanning again (``read_scan``)."""
        meta = {"klein_ray_scan": json.dumps({"version": SCAN_VERSION, "files": files})}
        with TableWriter(self.store, layout.SCAN, duplicates.schema.with_metadata(meta)) as writer:
            writer.write(duplicates.replace_schema_metadata(meta))

    def put_progress(self, progress: dict) -> None:
        """``_job/progress.json``: what a scheduler or `status` reads while the run goes on."""
        self._put_json(layout.PROGRESS, progress)

    def _put_json(self, key: str, obj: dict) -> None:
        self.store.put(key, json.dumps(obj, indent=1, sort_keys=True).encode(),
                       content_type="application/json")


def read_progress(store: Store) -> dict | None:
    """The latest run's progress, or None (absent or damaged: a person can see it in OUT)."""
    found = _read_json(store, layout.PROGRESS)
    return found or None


def read_state(store: Store) -> dict | None:
    """The job's state (manifest, total, run), {} if damaged (warned), None if absent."""
    return _read_json(store, layout.STATE)


def read_scan(store: Store, files: list[list]) -> pa.Table | None:
    """The duplicates a prescan of exactly these ``files`` found, or None (none recorded, another
    manifest or version, unreadable: scan again)."""
    try:
        table = get_table(store, layout.SCAN)
        meta = json.loads((table.schema.metadata or {}).get(b"klein_ray_scan", b"{}"))
    except NotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - any way the file fails to parse: scanned again
        log.warning("%s cannot be read (%s): the manifest is scanned again", layout.SCAN, type(exc).__name__)
        return None
    if meta.get("version") != SCAN_VERSION or meta.get("files") != files:
        return None
    return table.replace_schema_metadata(None)


def errors_head(store: Store, limit: int) -> tuple[list[RowError], int]:
    """The latest run's first ``limit`` errors and how many there are (row groups read only
    as far as needed; ``([], 0)`` when absent or damaged)."""
    fields = ("id", "stage", "error_type", "message", "attempts", "manifest_file", "manifest_row", "column")
    found: list[RowError] = []
    try:
        table = open_table(store, layout.ERRORS)
        total = table.metadata.num_rows
        for group in range(table.metadata.num_row_groups):
            if len(found) >= limit:
                break
            rows = table.read_row_group(group, columns=[f for f in fields if f in table.schema_arrow.names])
            found.extend(RowError(**{k: v for k, v in row.items() if v is not None})
                         for row in rows.slice(0, limit - len(found)).to_pylist())
    except NotFound:
        return [], 0
    except Exception as exc:  # noqa: BLE001 - any way the table fails to parse: it is damaged
        log.warning("%s cannot be read (%s): counted as no errors recorded", layout.ERRORS, type(exc).__name__)
        return [], 0
    return found, total


def error_batches(store: Store, columns: list[str]) -> Iterator[pa.Table]:
    """The latest run's errors, a row group of ``columns`` at a time (nothing when absent or
    damaged: warned)."""
    try:
        table = open_table(store, layout.ERRORS)
        groups = range(table.metadata.num_row_groups)
        names = table.schema_arrow.names
        for group in groups:
            yield table.read_row_group(group, columns=[c for c in columns if c in names])
    except NotFound:
        return
    except Exception as exc:  # noqa: BLE001 - any way the table fails to parse: it is damaged
        log.warning("%s cannot be read (%s): counted as no errors recorded", layout.ERRORS, type(exc).__name__)


def read_errors(store: Store) -> pa.Table | None:
    """The latest run's errors table, or None (absent, or damaged: warned)."""
    try:
        return get_table(store, layout.ERRORS)
    except NotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - any way the table fails to parse: it is damaged
        log.warning("%s cannot be read (%s): counted as no errors recorded", layout.ERRORS, type(exc).__name__)
        return None


def read_config(store: Store) -> JobConfig | None:
    """The job config the latest run resolved, or None (absent, damaged or from another
    version: whoever asks falls back to the state's digests)."""
    try:
        return JobConfig.model_validate(yaml.safe_load(store.get(layout.CONFIG)))
    except NotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - not YAML, not a config: it is damaged
        log.warning("%s cannot be read (%s)", layout.CONFIG, type(exc).__name__)
        return None


def markers_of(store: Store, ids: list[str], threads: int = 16) -> dict[str, dict | None]:
    """Each row's marker (None: absent or unreadable): a GET per row, ``threads`` at once (the
    report has at most MAX_CONTACT_ENTRIES rows)."""
    ledger = Ledger(store)
    with ThreadPoolExecutor(threads, thread_name_prefix="klein-ray-report") as pool:
        return dict(zip(ids, pool.map(ledger.read_meta, ids)))


def group_values(store: Store, ids: list[str], column: str) -> dict[str, str | None]:
    """Each row's value of ``column``, from its marker (its passthrough columns, else its own
    fields)."""
    return {row_id: group_value(meta, column) for row_id, meta in markers_of(store, ids).items()}


def read_contact(store: Store) -> list[ContactEntry]:
    """The contact sheet's entries (``[]`` when absent; ValueError when unreadable)."""
    try:
        return entries_from_parquet_bytes(store.get(layout.CONTACT))
    except NotFound:
        return []


def read_summary(store: Store) -> dict | None:
    """The latest run's summary (None if absent, {} if damaged: warned)."""
    return _read_json(store, layout.SUMMARY)


def _read_json(store: Store, key: str) -> dict | None:
    try:
        found = json.loads(store.get(key))
    except NotFound:
        return None
    except ValueError as exc:  # not JSON, not UTF-8
        log.warning("%s cannot be read (%s): taken as empty", key, type(exc).__name__)
        return {}
    return found if isinstance(found, dict) else {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

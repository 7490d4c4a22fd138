"""`klein-ray report OUT [--group-by COL] [--output PATH]`: the review page, built again.

From what the job log keeps (``_job/contact.parquet``: the images' thumbnails and their
references'; ``_job/summary.json``; ``_job/errors.parquet``) and the rows' markers (their
passthrough columns, for the groups; whether a test model made them), without rendering or
changing anything else. Written to ``OUT/_job/report.html`` unless ``--output`` names a local
file or an ``s3://`` key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from klein_ray.config import ConfigError, StorageConfig
from klein_ray.output import layout
from klein_ray.output.errors import KEEP
from klein_ray.output.joblog import errors_head, markers_of, read_contact, read_state, read_summary
from klein_ray.output.lease import LeaseRecord
from klein_ray.output.ledger import Ledger
from klein_ray.output.report import build_report
from klein_ray.output.review import group_value
from klein_ray.storage import NotFound, file_destination, open_store

log = logging.getLogger(__name__)
HTML = "text/html; charset=utf-8"


@dataclass(frozen=True)
class ReportResult:
    written: str  # where the page went
    images: int
    groups: int  # sections (0: not grouped)

    def summary(self) -> dict:
        return {"report": self.written, "images": self.images, "groups": self.groups}


def rebuild_report(out: str, group_by: str | None = None, dest: str | None = None,
                   storage: StorageConfig | None = None) -> ReportResult:
    storage = storage or StorageConfig()
    store = open_store(out, storage)
    if read_state(store) is None:
        raise ConfigError(f"no klein-ray output at {out} (no _job/state.json)")
    try:
        entries = read_contact(store)
    except Exception as exc:  # noqa: BLE001 - any way the file fails to parse
        raise ConfigError(f"{layout.CONTACT} in {out} cannot be read ({type(exc).__name__}); "
                          "the next render starts a new one") from None
    metas = markers_of(store, [e.id for e in entries])
    groups = None
    if group_by:
        groups = {row_id: group_value(meta, group_by) for row_id, meta in metas.items()}
        if entries and not any(groups.values()):
            raise ConfigError(f"--group-by {group_by}: no image of the report has that column "
                              f"(their columns: {', '.join(_columns(metas)) or 'none'})")
    summary = dict(read_summary(store) or {}, output=store.uri)
    noise = any(bool(m and m.get("generated_by_test_model")) for m in metas.values())
    errors, failed = errors_head(store, KEEP)
    page = build_report(summary, entries, errors, total_committed=Ledger(store).checkpoint.count(),
                        noise_model=noise, group_by=group_by, groups=groups, errors_total=failed)
    written = _put(store, dest, page.encode(), storage)
    return ReportResult(written, len(entries), len({v for v in (groups or {}).values()}))


def _columns(metas: dict[str, dict | None]) -> list[str]:
    """The passthrough columns the markers have, then the marker fields one may group by."""
    found: dict[str, None] = {}
    for meta in metas.values():
        found.update(dict.fromkeys((meta or {}).get("passthrough") or {}))
    return [*found, "variant", "seed", "width", "height", "format"]


def _put(store, dest: str | None, page: bytes, storage: StorageConfig) -> str:
    if dest is None:
        if _lease_held(store):
            log.warning("a run holds %s's lease: the page it writes when it finishes replaces this one",
                        store.uri)
        store.put(layout.REPORT, page, content_type=HTML)
        return store.url_of(layout.REPORT)
    root, key = file_destination(dest, "report destination", "review.html")
    if root.startswith("s3://"):
        target = open_store(root, storage)
        target.put(key, page, content_type=HTML)
        return target.url_of(key)
    path = Path(root) / key  # a plain file: no store's sidecar beside the user's page
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(page)
    return str(path)


def _lease_held(store) -> bool:
    try:
        record = json.loads(store.get(layout.LEASE))
        return isinstance(record, dict) and not LeaseRecord(**record).released
    except (NotFound, ValueError, TypeError):
        return False

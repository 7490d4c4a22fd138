"""The output layout: every key klein-ray writes under OUT, named in one place.

```
images/{id}.{png,jpg,webp}     the image (written first)
meta/{id}.json                 the row's commit marker (written last)
_job/config.yaml               the resolved job config
_job/state.json                manifest URI, row count, run id (for `status`)
_job/lease.json                the running driver's lease
_job/progress.json             the running (or last) run's progress, rewritten every few seconds
_job/results/{run}-L{level}-{seq}.parquet   the results table, which is the checkpoint
_job/errors.parquet            rows that failed in the latest run
_job/scan.parquet              the manifest's files (name, content tag) as last scanned, and its duplicate ids
_job/summary.json              the summary `render` prints last
_job/contact.parquet           the contact sheet's entries (thumbnails)
_job/report.html               the contact sheet
_job/damaged/                  job files found unreadable, moved aside (never deleted)
```

Row ids are checked against the manifest's id pattern before they get here, which is what keeps these keys
inside OUT; the store refuses anything that would escape its root all the same.
"""

from __future__ import annotations

from klein_ray.types import IMAGE_EXTENSIONS

IMAGES = "images/"
META = "meta/"
JOB = "_job/"
RESULTS = f"{JOB}results/"
DAMAGED = f"{JOB}damaged/"  # job files that could not be read, set aside for a person

CONFIG = f"{JOB}config.yaml"
STATE = f"{JOB}state.json"
LEASE = f"{JOB}lease.json"
PROGRESS = f"{JOB}progress.json"
ERRORS = f"{JOB}errors.parquet"
SCAN = f"{JOB}scan.parquet"  # the prescan's findings, keyed by the manifest files' content tags
SUMMARY = f"{JOB}summary.json"
CONTACT = f"{JOB}contact.parquet"
REPORT = f"{JOB}report.html"


def image_key(row_id: str, fmt: str) -> str:
    """Where a row's image lives: ``images/{id}.{ext}`` (``jpeg`` is stored as ``.jpg``)."""
    return f"{IMAGES}{row_id}.{IMAGE_EXTENSIONS[fmt]}"


def meta_key(row_id: str) -> str:
    """Where a row's commit marker lives."""
    return f"{META}{row_id}.json"


def id_of_meta_key(key: str) -> str | None:
    """The row id a listed marker key names, or None for anything else under ``meta/``."""
    name = key[len(META):] if key.startswith(META) else ""
    if name.endswith(".json") and "/" not in name:
        return name[: -len(".json")]
    return None


def results_part(run_id: str, level: int, seq: int) -> str:
    """A part of the results table: written by run ``run_id`` at merge level ``level``."""
    return f"{RESULTS}{run_id}-L{level}-{seq:06d}.parquet"

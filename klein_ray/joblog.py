"""The job log under ``OUT/_job/``: resolved config, state, results and errors tables, summary,
contact-sheet entries and ``report.html``. Written by the driver only; read by ``status``.

Results are written in parts as the run goes (so a 2-million-row run never holds them all in
memory); errors of the run are one table, rewritten at the end of each run, since every run
retries every row that is not committed.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from klein_ray.config import JobConfig
from klein_ray.report import MAX_CONTACT_ENTRIES, ContactEntry, build_report, entries_from_parquet_bytes, entries_to_parquet_bytes
from klein_ray.storage import NotFound, Store
from klein_ray.types import RowError, RowResult

JOB = "_job"
RESULTS_PART_ROWS = 50_000

RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()), ("variant", pa.string()), ("image_key", pa.string()),
    ("meta_key", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("seed", pa.int64()),
    ("render_s", pa.float64()), ("worker", pa.string()), ("run_id", pa.string()),
])
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("stage", pa.string()), ("error_type", pa.string()),
    ("message", pa.string()), ("attempts", pa.int32()), ("column", pa.string()),
    ("manifest_file", pa.string()), ("manifest_row", pa.int64()), ("run_id", pa.string()),
])


class JobLog:
    def __init__(self, store: Store, config: JobConfig, manifest_uri: str):
        self.store = store
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.config = config
        self.manifest_uri = manifest_uri
        self._results: list[RowResult] = []
        self._part = 0
        self.contact = self._load_contact()
        self._contact_ids = {e.id for e in self.contact}

    def start(self, total_rows: int) -> None:
        cfg = self.config.model_dump(mode="json")
        self.store.put(f"{JOB}/config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode(),
                       content_type="application/yaml")
        self._put_json("state.json", {"manifest": self.manifest_uri, "total": total_rows,
                                      "run_id": self.run_id, "started_at": _now()})

    def add_result(self, result: RowResult) -> None:
        self._results.append(result)
        if len(self.contact) < MAX_CONTACT_ENTRIES and result.id not in self._contact_ids:
            self.contact.append(ContactEntry(
                id=result.id, prompt=result.prompt, variant=result.variant, seed=result.seed,
                width=result.width, height=result.height,
                render_ms=1000 * result.timings.get("render", 0.0), image_key=result.image_key,
                thumbnail=result.thumbnail,
            ))
            self._contact_ids.add(result.id)
        if len(self._results) >= RESULTS_PART_ROWS:
            self.flush_results()

    def flush_results(self) -> None:
        if not self._results:
            return
        rows = [{
            "id": r.id, "variant": r.variant, "image_key": r.image_key, "meta_key": r.meta_key,
            "sha256": r.sha256, "bytes": r.bytes, "width": r.width, "height": r.height,
            "seed": r.seed, "render_s": r.timings.get("render"), "worker": r.worker,
            "run_id": self.run_id,
        } for r in self._results]
        self._put_table(f"results/{self.run_id}-{self._part:05d}.parquet",
                        pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
        self._part += 1
        self._results.clear()

    def finish(self, errors: list[RowError], summary: dict, committed_total: int, noise_model: bool) -> None:
        """Write the errors table, summary, contact entries and the report (in that order)."""
        self.flush_results()
        rows = [dict(asdict(e), run_id=self.run_id) for e in errors]
        self._put_table("errors.parquet", pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA))
        self._put_json("summary.json", summary)
        self.store.put(f"{JOB}/contact.parquet", entries_to_parquet_bytes(self.contact))
        html = build_report(summary, self.contact, errors, total_committed=committed_total,
                            noise_model=noise_model)
        self.store.put(f"{JOB}/report.html", html.encode(), content_type="text/html; charset=utf-8")

    # -- helpers ---------------------------------------------------------------------------

    def _load_contact(self) -> list[ContactEntry]:
        try:
            return entries_from_parquet_bytes(self.store.get(f"{JOB}/contact.parquet"))
        except NotFound:
            return []

    def _put_json(self, name: str, obj: dict) -> None:
        self.store.put(f"{JOB}/{name}", json.dumps(obj, indent=1, sort_keys=True).encode(),
                       content_type="application/json")

    def _put_table(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.store.put(f"{JOB}/{name}", buf.getvalue(), content_type="application/vnd.apache.parquet")


def read_state(store: Store) -> dict | None:
    try:
        return json.loads(store.get(f"{JOB}/state.json"))
    except NotFound:
        return None


def read_errors(store: Store) -> pa.Table | None:
    try:
        return pq.ParquetFile(io.BytesIO(store.get(f"{JOB}/errors.parquet"))).read()
    except NotFound:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def elapsed(start: float) -> float:
    return round(time.monotonic() - start, 3)

"""Helpers shared by the end-to-end tests: running the CLI, writing manifests and job configs,
and checking SPEC's definition of done against a store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from klein_ray.intake.schema import manifest_schema

REPO = Path(__file__).resolve().parents[1]
ROWS_BASE = Path("/srv/manifests")  # the manifest directory row validation tests resolve against

MANIFEST_SCHEMA = manifest_schema([("sku", pa.string()), ("priority", pa.int64())])


def row(**kw) -> dict:
    base = {name: None for name in MANIFEST_SCHEMA.names}
    base.update(kw)
    return base


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema = MANIFEST_SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_config(path: Path, models: dict[str, Path], **extra) -> Path:
    cfg = {
        "default_variant": "tiny",
        "variants": {
            "tiny": {"source": str(models["tiny"]), "pipeline": "distilled", "actors": 1, "batch_size": 4},
            "tiny-base": {"source": str(models["tiny-base"]), "pipeline": "base", "actors": 1,
                          "batch_size": 2, "steps": 6, "guidance": 3.0},
        },
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run `python -m klein_ray ARGS`; returns the CompletedProcess (text)."""
    env = dict(env or os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "klein_ray", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=timeout)


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def assert_done(store, row_id: str) -> dict:
    """SPEC: meta/{id}.json exists and names an image whose sha256 matches. Returns the meta."""
    meta = json.loads(store.get(f"meta/{row_id}.json"))
    data = store.get(meta["image"]["key"])
    assert hashlib.sha256(data).hexdigest() == meta["image"]["sha256"], row_id
    assert len(data) == meta["image"]["bytes"]
    return meta


def snapshot(store) -> dict[str, tuple[int, str]]:
    """Key -> (size, sha256) of every image and marker, to prove a re-run changed nothing."""
    out = {}
    for prefix in ("images/", "meta/"):
        for obj in store.list(prefix):
            out[obj.key] = (obj.size, hashlib.sha256(store.get(obj.key)).hexdigest())
    return out


def stop_ray_under(tmpdir: Path) -> None:
    """Stop the processes of the cluster recorded under ``tmpdir``, by pid. Not `ray stop`: it
    kills every Ray process on the machine whatever RAY_TMPDIR says (Ray 2.60 matches process
    names), other sessions' clusters included."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(tmpdir) in " ".join(proc.info["cmdline"] or ()):
                mine.append(proc)
        except (psutil.Error, TypeError):
            continue
    for proc in mine:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=3)  # then as `ray stop --force` would
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def passthrough_store():
    """A ``Store`` that forwards every call to ``inner``: tests subclass it and override the
    call where they force an interleaving (another writer acting between two of ours)."""
    from klein_ray.storage import Store

    class PassThrough(Store):
        def __init__(self, inner: Store):
            self.inner, self.uri, self.fenced_delete = inner, inner.uri, inner.fenced_delete

        def put(self, key, data, **kw):
            return self.inner.put(key, data, **kw)

        def get(self, key, max_bytes=None):
            return self.inner.get(key, max_bytes)

        def get_versioned(self, key, max_bytes=None):
            return self.inner.get_versioned(key, max_bytes)

        def head(self, key):
            return self.inner.head(key)

        def list(self, prefix=""):
            return self.inner.list(prefix)

        def delete(self, key, if_match=None):
            return self.inner.delete(key, if_match)

        def download(self, key, dest):
            return self.inner.download(key, dest)

        def put_file(self, key, path, **kw):
            return self.inner.put_file(key, path, **kw)

    return PassThrough


def rows_config(**refs):
    """The job config the row validation tests validate against: two variants, references
    settings from ``refs``."""
    from klein_ray.config import JobConfig, ReferenceConfig, VariantConfig

    return JobConfig(
        default_variant="tiny",
        variants={
            "tiny": VariantConfig(source="./m", batch_size=4),
            "tiny-base": VariantConfig(source="./b", steps=8, guidance=6.5),
        },
        references=ReferenceConfig(**refs) if refs else ReferenceConfig(),
    )


def lease_released(out) -> bool:
    """No driver holds the output's lease: its record says released (it is never deleted: it
    keeps the epoch the next holder counts from), or there is none at all."""
    from klein_ray.output.layout import LEASE
    from klein_ray.storage import LocalStore, NotFound, Store

    store = out if isinstance(out, Store) else LocalStore(out)
    try:
        return bool(json.loads(store.get(LEASE)).get("released"))
    except NotFound:
        return True

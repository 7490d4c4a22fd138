"""The state ``benchmarks/resume.py`` resumes from: a moto S3 server and the OUT a killed job leaves.

It owns the setup, run in the benchmark's parent process: the moto server, the manifests, the
checkpoint parts (written by ``klein_ray.output.checkpoint.Checkpoint`` itself), the markers
under ``meta/`` (real PUTs at full scale, injected into moto's backend at the baseline's scale),
and the compacted copy. ``setup`` returns the ``spec`` that names every OUT and its figures.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

BUCKET_FULL, BUCKET_BASE = "bench-resume-full", "bench-resume-base"
MARKER_BODY = json.dumps({
    "id": "ID", "variant": "tiny", "prompt": "x" * 120, "seed": 1234567890123, "width": 512,
    "height": 512, "steps": 4, "guidance": 4.0, "format": "png", "run_id": "20261125T000000Z-abcdef",
    "image": {"key": "images/ID.png", "sha256": "0" * 64, "bytes": 400000, "content_type": "image/png"},
    "timings": {"fetch": 0.0, "render": 1.2, "encode": 0.05, "store": 0.08}, "worker": "node-1/actor-0",
}, sort_keys=True, indent=1)


def row_id(i: int) -> str:
    return f"row-{i + 1:07d}"


def start_moto():
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ[k] = v
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    return server


def write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([row_id(i) for i in range(rows)], pa.string()),
        "prompt": pa.array([f"a watercolour lighthouse at dusk, study {i}" for i in range(rows)], pa.string()),
        "width": pa.array([512] * rows, pa.int32()),
        "height": pa.array([512] * rows, pa.int32()),
    })
    pq.write_table(table, path, row_group_size=65536)


def done_indices(rows: int, done: int, layout: str) -> list[int]:
    if layout == "tail":  # a job killed late: it renders in manifest order, so a prefix is done
        return list(range(done))
    import random

    return sorted(random.Random(0).sample(range(rows), done))


def write_checkpoint(store, ids: list[str], run_id: str, manifest: Path, rows: list[int]) -> int:
    """What an uncompacted job leaves: Checkpoint.record() for every committed row (a part per
    FLUSH_ROWS), each with its origin in ``manifest`` (its position ``rows[n]``), then the final
    flush(). Returns the number of parts."""
    import hashlib

    from klein_ray.intake.rows import derive_seed
    from klein_ray.intake.schema import setup_group
    from klein_ray.output.checkpoint import Checkpoint, Origin
    from klein_ray.output.layout import RESULTS as PREFIX
    from klein_ray.types import RowResult

    tag, group = hashlib.sha256(manifest.read_bytes()).hexdigest(), setup_group({})
    cp = Checkpoint(store, run_id)
    for n, rid in enumerate(ids):
        cp.record(RowResult(
            id=rid, variant="tiny", image_key=f"images/{rid}.png", meta_key=f"meta/{rid}.json",
            sha256=os.urandom(32).hex(), bytes=400_000 + n % 5000, width=512, height=512,
            seed=derive_seed(rid), prompt="", timings={"render": 1.0 + (n % 97) / 100},
            worker=f"node-{n % 8}/actor-{n % 4}"), Origin(manifest.name, tag, rows[n], group))
    cp.flush()
    return sum(1 for o in store.list(PREFIX) if o.key.endswith(".parquet"))


def s3_backend(bucket: str):
    from moto.s3.models import s3_backends

    partition, account = s3_backends.bucket_accounts[bucket]
    return s3_backends[account][partition]


def inject_markers(bucket: str, prefix: str, ids: list[str]) -> None:
    """Marker objects straight into moto's in-process backend (HTTP would take ~20 min per 100k)."""
    backend = s3_backend(bucket)
    for rid in ids:
        backend.put_object(bucket, f"{prefix}/meta/{rid}.json", MARKER_BODY.replace("ID", rid).encode(),
                           disable_notification=True)


def id_column_share(store, key: str) -> float:
    """The share of a checkpoint part's bytes that is the ``id`` column (what the old load() read)."""
    import io

    import pyarrow.parquet as pq

    data = store.get(key)
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    col = names.index("id")
    return sum(md.row_group(g).column(col).total_compressed_size for g in range(md.num_row_groups)) / len(data)


def setup(args, tmp: Path, log) -> dict:
    """Every OUT the scenarios resume from, in the order they are built; returns their ``spec``."""
    import boto3

    from klein_ray.config import StorageConfig
    from klein_ray.storage.s3 import s3_client

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for b in (BUCKET_FULL, BUCKET_BASE):
        s3.create_bucket(Bucket=b)
    cfg = StorageConfig()
    s3_client(cfg)
    model_dir = tmp / "model"  # Driver only normalises the source path; nothing is loaded
    model_dir.mkdir()
    spec: dict = {"model_dir": str(model_dir)}

    full_rows, full_done = args.rows, int(round(args.rows * args.done))
    parts_out, parts_store = _full_scale(args, tmp, cfg, spec, full_rows, full_done, log)
    compact_out = _compacted(s3, cfg, parts_store, spec, log)
    base_rows, base_done = args.baseline_rows, int(round(args.baseline_rows * args.done))
    base_out = _baseline_scale(args, tmp, cfg, spec, base_rows, base_done, log)
    spec.update(parts_out=parts_out, compact_out=compact_out, base_out=base_out,
                full_rows=full_rows, full_done=full_done, base_rows=base_rows, base_done=base_done)
    return spec


def _full_scale(args, tmp: Path, cfg, spec: dict, full_rows: int, full_done: int, log):
    """Full scale: the manifest, the checkpoint parts (99 at 1M rows), and a few hundred real markers."""
    from klein_ray.storage import open_store

    t = time.perf_counter()
    spec["full_manifest"] = str(tmp / f"manifest-{full_rows}.parquet")
    write_manifest(Path(spec["full_manifest"]), full_rows)
    done_rows = done_indices(full_rows, full_done, args.layout)
    done_ids = [row_id(i) for i in done_rows]
    parts_out = f"s3://{BUCKET_FULL}/parts"
    parts_store = open_store(parts_out, cfg)
    spec["full_parts"] = write_checkpoint(parts_store, done_ids, "20261124T120000Z-a1b2c3",
                                          Path(spec["full_manifest"]), done_rows)
    for rid in done_ids[:args.markers]:  # real PUTs over HTTP
        parts_store.put(f"meta/{rid}.json", MARKER_BODY.replace("ID", rid).encode(),
                        content_type="application/json", if_absent=True)
    log(f"  full-scale OUT {parts_out}: {spec['full_parts']} parts, {args.markers} markers "
        f"({time.perf_counter() - t:.1f} s)")
    return parts_out, parts_store


def _compacted(s3, cfg, parts_store, spec: dict, log) -> str:
    """The same state after Checkpoint.compact() (what a run that finished its flushes leaves)."""
    from klein_ray.output.checkpoint import Checkpoint
    from klein_ray.output.layout import RESULTS as PREFIX
    from klein_ray.storage import open_store

    t = time.perf_counter()
    compact_out = f"s3://{BUCKET_FULL}/compacted"
    compact_store = open_store(compact_out, cfg)
    for o in parts_store.list(PREFIX):
        s3.copy_object(Bucket=BUCKET_FULL, Key=f"compacted/{o.key}",
                       CopySource={"Bucket": BUCKET_FULL, "Key": f"parts/{o.key}"})
    for o in parts_store.list("meta/"):
        s3.copy_object(Bucket=BUCKET_FULL, Key=f"compacted/{o.key}",
                       CopySource={"Bucket": BUCKET_FULL, "Key": f"parts/{o.key}"})
    tc = time.perf_counter()
    Checkpoint(compact_store, "20261124T130000Z-d4e5f6").compact()
    spec["compact_s"] = time.perf_counter() - tc
    spec["compact_parts"] = sum(1 for o in compact_store.list(PREFIX) if o.key.endswith(".parquet"))
    spec["compact_mb"] = sum(o.size for o in compact_store.list(PREFIX)) / 2**20
    spec["parts_mb"] = sum(o.size for o in parts_store.list(PREFIX)) / 2**20
    spec["id_share"] = id_column_share(parts_store, next(iter(parts_store.list(PREFIX))).key)
    log(f"  full-scale OUT {compact_out}: {spec['compact_parts']} part ({spec['compact_mb']:.1f} MB; "
        f"Checkpoint.compact() took {spec['compact_s']:.1f} s) ({time.perf_counter() - t:.1f} s)")
    return compact_out


def _baseline_scale(args, tmp: Path, cfg, spec: dict, base_rows: int, base_done: int, log) -> str:
    """Baseline scale: every marker exists (injected), and the checkpoint parts too."""
    from klein_ray.storage import open_store

    t = time.perf_counter()
    spec["base_manifest"] = str(tmp / f"manifest-{base_rows}.parquet")
    write_manifest(Path(spec["base_manifest"]), base_rows)
    base_rows_done = done_indices(base_rows, base_done, args.layout)
    base_ids = [row_id(i) for i in base_rows_done]
    base_out = f"s3://{BUCKET_BASE}/out"
    spec["base_parts"] = write_checkpoint(open_store(base_out, cfg), base_ids, "20261124T140000Z-0a0b0c",
                                          Path(spec["base_manifest"]), base_rows_done)
    inject_markers(BUCKET_BASE, "out", base_ids)
    log(f"  baseline-scale OUT {base_out}: {base_done:,} markers (injected), {spec['base_parts']} parts "
        f"({time.perf_counter() - t:.1f} s)")
    return base_out

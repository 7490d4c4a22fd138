"""End to end on real parts: a mixed manifest read from s3:// on Ceph RGW, rendered by the tiny
real pipeline on Ray actors, written to s3:// on the same server. Then: every row done by SPEC's
definition, a re-run that renders and changes nothing, `status`, and each mode's image equal to
a direct Flux2KleinPipeline call (batch of one) within 2/255."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from helpers import assert_done, last_json, row, run_cli, write_config, write_manifest
from PIL import Image

from klein_ray.intake.rows import derive_seed
from klein_ray.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def _ref_png(size, colour) -> bytes:
    img = Image.new("RGB", size, (230, 230, 230))
    img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def job(rgw, tiny_models, ray_address, tmp_path_factory):
    """Upload references and a two-file manifest, render once; shared by the tests below."""
    tmp = tmp_path_factory.mktemp("e2e-s3")
    s3 = rgw.client()
    bucket = rgw.new_bucket()
    refs = {"s3_shoe": _ref_png((192, 128), (200, 30, 30)), "s3_bag": _ref_png((128, 128), (30, 30, 200))}
    for name, data in refs.items():
        s3.put_object(Bucket=bucket, Key=f"refs/{name}.png", Body=data)
    disk_ref = tmp / "disk_mug.png"
    disk_ref.write_bytes(_ref_png((128, 160), (30, 160, 60)))
    refs["disk_mug"] = disk_ref.read_bytes()
    s3_shoe, s3_bag = f"s3://{bucket}/refs/s3_shoe.png", f"s3://{bucket}/refs/s3_bag.png"

    rows_a = [
        row(id="t2i-a", prompt="a red sneaker", width=128, height=128, seed=1, sku="S1", priority=1),
        row(id="t2i-b", prompt="a blue mug", width=128, height=128, seed=2, sku="S2"),
        row(id="t2i-wide", prompt="a wide banner", width=192, height=128, format="jpeg"),
        row(id="t2i-tall", prompt="a tall poster", width=128, height=192, format="webp", seed=5),
        row(id="edit-s3", prompt="put the shoe on sand", references=[s3_shoe], seed=11),
        row(id="edit-s3-2", prompt="put the shoe on snow", references=[s3_shoe]),
    ]
    rows_b = [
        row(id="edit-disk", prompt="make the mug glossy", references=[str(disk_ref)], format="jpeg", seed=12),
        row(id="multi", prompt="the bag beside the mug", references=[s3_bag, disk_ref.as_uri()],
            width=128, height=128, seed=13),
        row(id="base-t2i", prompt="an isometric shop", variant="tiny-base", width=128, height=128,
            guidance=3.5, seed=21),
        row(id="base-edit", prompt="turn it blue", variant="tiny-base", references=[s3_bag],
            format="webp", seed=22, priority=7),
    ]
    for i, rows in enumerate((rows_a, rows_b)):
        local = write_manifest(tmp / f"part-{i}.parquet", rows)
        s3.upload_file(str(local), bucket, f"manifests/part-{i}.parquet")
    # An S3 manifest allows no local reference by default: the disk references' directory is
    # opened deliberately.
    config = write_config(tmp / "job.yaml", tiny_models, references={"local_roots": [str(tmp)]})
    args = ("render", f"s3://{bucket}/manifests/", "--output", f"s3://{bucket}/out",
            "--config", str(config), "--address", ray_address, "--no-progress")
    first = run_cli(*args, env=rgw.env())
    return dict(bucket=bucket, rows=rows_a + rows_b, refs=refs, args=args, first=first,
                models=tiny_models, config=config)


def test_every_row_committed(job, rgw, s3_env):
    s3_env(rgw)
    first = job["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    summary = last_json(first.stdout)
    n = len(job["rows"])
    assert summary["total"] == n and summary["committed"] == n
    assert summary["failed"] == 0 and summary["skipped"] == 0
    store = open_store(f"s3://{job['bucket']}/out")
    for spec in job["rows"]:
        meta = assert_done(store, spec["id"])
        fmt = spec["format"] or "png"
        assert meta["image"]["key"] == f"images/{spec['id']}.{ {'png': 'png', 'jpeg': 'jpg', 'webp': 'webp'}[fmt]}"
        image = Image.open(io.BytesIO(store.get(meta["image"]["key"])))
        assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert meta["seed"] == (spec["seed"] if spec["seed"] is not None else derive_seed(spec["id"]))
        assert meta["variant"] == (spec["variant"] or "tiny")
        assert meta["steps"] == (6 if meta["variant"] == "tiny-base" else 4)
        assert meta["passthrough"]["sku"] == spec["sku"] and meta["passthrough"]["priority"] == spec["priority"]
        assert meta["generated_by_test_model"] is True
        assert image.size == (meta["width"], meta["height"])
        if spec["width"]:
            assert image.size == (spec["width"], spec["height"])
        assert len(meta["references"]) == len(spec["references"] or [])


def test_reference_hashes_and_derived_sizes(job, rgw, s3_env):
    s3_env(rgw)
    store = open_store(f"s3://{job['bucket']}/out")
    meta = json.loads(store.get("meta/edit-s3.json"))
    assert meta["references"][0]["sha256"] == hashlib.sha256(job["refs"]["s3_shoe"]).hexdigest()
    assert (meta["width"], meta["height"]) == (192, 128)  # the first reference's size
    meta = json.loads(store.get("meta/multi.json"))
    assert [r["sha256"] for r in meta["references"]] == [
        hashlib.sha256(job["refs"]["s3_bag"]).hexdigest(), hashlib.sha256(job["refs"]["disk_mug"]).hexdigest()]
    # Rows sharing size and references were rendered in one call.
    assert json.loads(store.get("meta/t2i-a.json"))["batch"]["ids"] == ["t2i-a", "t2i-b"]


def test_job_log_written(job, rgw, s3_env):
    s3_env(rgw)
    store = open_store(f"s3://{job['bucket']}/out")
    keys = {o.key for o in store.list("_job/")}
    for name in ("_job/config.yaml", "_job/state.json", "_job/summary.json", "_job/errors.parquet",
                 "_job/report.html", "_job/contact.parquet"):
        assert name in keys
    assert any(k.startswith("_job/results/") for k in keys)
    html = store.get("_job/report.html").decode()
    assert html.count('class="thumb"') == len(job["rows"])


def test_rerun_renders_and_changes_nothing(job, rgw):
    s3 = rgw.client()

    def listing():
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=job["bucket"], Prefix="out/")
        return {o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])
                if not o["Key"].startswith("out/_job/")}

    before = listing()
    again = run_cli(*job["args"], env=rgw.env())
    assert again.returncode == 0, again.stderr[-3000:]
    summary = last_json(again.stdout)
    assert summary["committed"] == 0 and summary["skipped"] == len(job["rows"]) and summary["failed"] == 0
    assert listing() == before

    status = run_cli("status", f"s3://{job['bucket']}/out", env=rgw.env())
    assert status.returncode == 0, status.stderr
    assert last_json(status.stdout) == {"committed": len(job["rows"]), "failed": 0, "remaining": 0,
                                      "foreign": 0, "unreadable": 0, "stale": 0, "outdated": 0}


@pytest.mark.parametrize("row_id", ["t2i-a", "edit-s3", "multi", "base-t2i"])
def test_matches_direct_pipeline_call(job, rgw, s3_env, row_id):
    """Each mode (text-to-image, single- and multi-reference, Base with CFG) equals diffusers'
    own pipeline called directly for that row alone, within 2/255 per pixel."""
    import torch
    from diffusers import Flux2KleinPipeline

    s3_env(rgw)
    store = open_store(f"s3://{job['bucket']}/out")
    spec = next(r for r in job["rows"] if r["id"] == row_id)
    meta = assert_done(store, row_id)
    ours = np.asarray(Image.open(io.BytesIO(store.get(meta["image"]["key"]))).convert("RGB"), dtype=np.int16)

    variant = spec["variant"] or "tiny"
    pipe = Flux2KleinPipeline.from_pretrained(str(job["models"][variant]))
    refs = [Image.open(io.BytesIO(_read_ref(uri, job, rgw))).convert("RGB") for uri in spec["references"] or []]
    image = pipe(
        prompt=spec["prompt"], image=refs or None, height=spec["height"], width=spec["width"],
        num_inference_steps=meta["steps"], guidance_scale=spec["guidance"] or 3.0,
        generator=torch.Generator("cpu").manual_seed(meta["seed"]),
    ).images[0]
    direct = np.asarray(image, dtype=np.int16)
    assert direct.shape == ours.shape
    assert np.abs(direct - ours).max() <= 2


def _read_ref(uri: str, job, rgw) -> bytes:
    if uri.startswith("s3://"):
        bucket, key = uri[5:].split("/", 1)
        return rgw.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return open(uri.removeprefix("file://"), "rb").read()


def test_model_source_synced_from_s3(rgw, tiny_models, ray_address, tmp_path, s3_env):
    """A variant whose source is an s3:// prefix is synced into the node cache and loaded from
    there by the same from_pretrained path."""
    import yaml

    s3_env(rgw)
    s3 = rgw.client()
    bucket = rgw.new_bucket()
    model_dir = tiny_models["tiny"]
    for path in model_dir.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"models/tiny/{path.relative_to(model_dir).as_posix()}")
    cache = tmp_path / "cache"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "default_variant": "remote",
        "variants": {"remote": {"source": f"s3://{bucket}/models/tiny/", "pipeline": "distilled"}},
        "run": {"cache_dir": str(cache)},
    }))
    manifest = write_manifest(tmp_path / "m.parquet", [row(id="remote-1", prompt="a cup", width=64, height=64)])
    proc = run_cli("render", str(manifest), "--output", f"s3://{bucket}/out", "--config", str(config),
                   "--address", ray_address, "--no-progress", env=rgw.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = assert_done(open_store(f"s3://{bucket}/out"), "remote-1")
    assert meta["model"]["source"] == f"s3://{bucket}/models/tiny/"
    synced = [p for p in (cache / "models").iterdir() if p.is_dir()]
    assert len(synced) == 1 and (synced[0] / ".complete").is_file()
    assert (synced[0] / "transformer" / "config.json").is_file()

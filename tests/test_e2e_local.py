"""End to end into a local directory: the demo and its report in a real browser, bad rows as
error records (exit 1), unusable manifests (exit 2), and `validate`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import assert_done, last_json, row, run_cli, write_config, write_manifest

from klein_ray.storage import LocalStore


@pytest.mark.subprocess
@pytest.mark.slow
def test_demo_renders_example_and_report_opens_in_browser(tmp_path, chromium):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--output", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    table = pq.ParquetFile("manifests/example.parquet").read()
    assert summary["total"] == table.num_rows == summary["committed"]
    store = LocalStore(out)
    for row_id in table.column("id").to_pylist():
        assert_done(store, row_id)
    report = out / "_job" / "report.html"
    assert report.is_file()
    seen = chromium(report, screenshot=tmp_path / "report.png")
    assert seen["thumbs"] == table.num_rows  # (besides them: the edits' reference thumbnails)
    assert seen["loaded"] == seen["images"] and not seen["broken"]
    assert "noise" in seen["text"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_bad_rows_are_error_records_and_good_rows_render(tmp_path, tiny_models, ray_address):
    outside = set(tmp_path.iterdir())
    rows = [
        row(id="good-1", prompt="a lamp", width=64, height=64, seed=1),
        row(id="good-2", prompt="a chair", width=64, height=64, format="jpeg"),
        row(id="../escape", prompt="x", width=64, height=64),
        row(id="has space", prompt="x", width=64, height=64),
        row(id="dup", prompt="first", width=64, height=64),
        row(id="dup", prompt="second", width=64, height=64),
        row(id="empty-prompt", prompt="  ", width=64, height=64),
        row(id="odd-size", prompt="x", width=100, height=64),
        row(id="ghost-variant", prompt="x", variant="nope", width=64, height=64),
        row(id="gif-format", prompt="x", format="gif", width=64, height=64),
        row(id="missing-ref", prompt="x", references=[str(tmp_path / "nope.png")]),
        row(id="not-an-image", prompt="x", references=[str(tmp_path / "text.png")]),
    ]
    (tmp_path / "text.png").write_text("this is not an image")
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models)
    out = tmp_path / "out"
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert summary["committed"] == 2 and summary["failed"] == len(rows) - 2
    # Each actor's load reaches the driver's log, with how its model runs (eager on a CPU).
    assert "loaded its model in" in proc.stderr and "on cpu (eager)" in proc.stderr, proc.stderr[-3000:]
    store = LocalStore(out)
    assert_done(store, "good-1") and assert_done(store, "good-2")
    errors = pq.ParquetFile(out / "_job" / "errors.parquet").read().to_pylist()
    by_id = {}
    for e in errors:
        by_id.setdefault(e["id"], []).append(e)
    assert len(by_id["dup"]) == 2 and by_id["dup"][0]["error_type"] == "DuplicateId"
    assert by_id["../escape"][0]["column"] == "id"  # the id as written, to find the row by
    assert by_id["has space"][0]["column"] == "id"
    assert "empty" in by_id["empty-prompt"][0]["message"]
    assert "multiple of 16" in by_id["odd-size"][0]["message"]
    assert "unknown variant" in by_id["ghost-variant"][0]["message"]
    assert "unknown format" in by_id["gif-format"][0]["message"]
    assert by_id["missing-ref"][0]["stage"] == "fetch"
    assert by_id["not-an-image"][0]["stage"] == "fetch" and "not a readable image" in by_id["not-an-image"][0]["message"]
    # Nothing was written outside OUT (the manifest, config and fixture files were there before).
    assert set(tmp_path.iterdir()) - outside == {out, manifest, tmp_path / "job.yaml", tmp_path / "text.png"}
    assert not list(tmp_path.glob("escape*"))
    status = run_cli("status", str(out))
    assert last_json(status.stdout) == {"committed": 2, "failed": len(rows) - 2, "remaining": 0,
                                      "foreign": 0, "unreadable": 0, "stale": 0, "outdated": 0}


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["missing", "not-parquet", "no-prompt", "wrong-type"])
def test_unusable_manifest_exits_2_before_rendering(tmp_path, case):
    path = tmp_path / "m.parquet"
    if case == "not-parquet":
        path.write_text("id,prompt\na,b\n")
    elif case == "no-prompt":
        pq.write_table(pa.table({"id": ["a"]}), path)
    elif case == "wrong-type":
        pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "width": ["wide"]}), path)
    proc = run_cli("render", str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(path) in proc.stderr or "m.parquet" in proc.stderr
    expected = {"missing": "no such file", "not-parquet": "not a Parquet file",
                "no-prompt": "missing required column 'prompt'", "wrong-type": "column 'width'"}[case]
    assert expected in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_validate_lists_every_problem(tmp_path):
    rows = [row(id="ok", prompt="fine"), row(id="bad id", prompt="", width=65),
            row(id="ok", prompt="again")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    proc = run_cli("validate", str(manifest))
    assert proc.returncode == 2
    text = proc.stdout
    assert "column=id" in text and "column=prompt" in text and "column=width" in text
    assert text.count("DuplicateId") == 0 and text.count("more than once") == 2
    assert json.loads(text.strip().splitlines()[-1])["problems"] == 5
    clean = write_manifest(tmp_path / "clean.parquet", [row(id="a", prompt="p")])
    assert run_cli("validate", str(clean)).returncode == 0


@pytest.mark.subprocess
@pytest.mark.slow
def test_model_that_fails_to_load_fails_its_rows_not_the_job(tmp_path, tiny_models, ray_address):
    """Bounded retries, a clear message, its rows in the errors table; other variants render."""
    import shutil

    import yaml

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["tiny"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "default_variant": "tiny",
        "variants": {"tiny": {"source": str(tiny_models["tiny"]), "pipeline": "distilled"},
                     "broken": {"source": str(broken)}},
        "run": {"model_load_attempts": 2},
    }))
    manifest = write_manifest(tmp_path / "m.parquet", [
        row(id="ok", prompt="a vase", width=64, height=64),
        row(id="bad-1", prompt="a vase", variant="broken", width=64, height=64),
        row(id="bad-2", prompt="a bowl", variant="broken", width=64, height=64),
    ])
    out = tmp_path / "out"
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "variant 'broken' failed to load after 2 attempt(s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_done(LocalStore(out), "ok")
    errors = pq.ParquetFile(out / "_job" / "errors.parquet").read().to_pylist()
    assert sorted(e["id"] for e in errors) == ["bad-1", "bad-2"]
    assert {e["error_type"] for e in errors} == {"ModelLoadError"}

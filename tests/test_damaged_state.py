"""Damaged state is recovered, never fatal, and never counted as done: a checkpoint part cut
short, a garbage contact sheet, state or errors table, a config that is not UTF-8, a manifest
with invalid UTF-8 in a passthrough column, and what `render --verify` leaves when it is cut off
right after claiming a row for repair. Each command ends with its documented exit code and a
one-line reason, never a traceback. (Before: tracebacks with exit 1, a broken render for a
garbage contact.parquet, a killed repair reported as skipped.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_config
from localrun import job, manifest, render, rows, shared_worker

from klein_ray.cli import main
from klein_ray.commands.status import output_status
from klein_ray.output import layout
from klein_ray.storage import LocalStore


def _rendered(tmp_path, tiny_models, n: int = 4):
    cfg, out = job(tiny_models), tmp_path / "out"
    uri = manifest(tmp_path / "m.parquet", rows(n))
    assert render(uri, str(out), cfg)[1] == 0
    return cfg, out, uri


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_cut_checkpoint_part_is_set_aside_and_the_truth_rebuilt_from_markers(tmp_path, tiny_models, capsys):
    cfg, out, uri = _rendered(tmp_path, tiny_models)
    (part,) = (out / "_job" / "results").glob("*.parquet")
    part.write_bytes(part.read_bytes()[:40])  # cut short
    code, stdout, _ = _cli(capsys, "status", str(out))
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["committed"] == 4
    code, stdout, _ = _cli(capsys, "verify", str(out))
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["checked"] == 4
    summary, code = render(uri, str(out), cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (0, 4)  # found by the markers
    assert [p.name for p in (out / "_job" / "damaged").iterdir()] == [next((out / "_job" / "damaged").iterdir()).name]
    assert next((out / "_job" / "damaged").iterdir()).name.endswith(part.name)
    summary, code = render(uri, str(out), cfg, verify_first="shallow")
    assert code == 0 and summary["committed"] == 0


def test_garbage_job_files_cost_a_warning_not_the_run(tmp_path, tiny_models, capsys):
    cfg, out, uri = _rendered(tmp_path, tiny_models)
    for name in ("contact.parquet", "errors.parquet", "progress.json"):
        (out / "_job" / name).write_bytes(b"\x00garbage\xff")
    code, stdout, err = _cli(capsys, "status", str(out))
    assert code == 0 and "Traceback" not in err
    summary, code = render(uri, str(out), cfg)
    assert code == 0 and summary["skipped"] == 4
    assert any(p.name.endswith("contact.parquet") for p in (out / "_job" / "damaged").iterdir())
    (out / "_job" / "state.json").write_bytes(b"{not json")
    code, stdout, err = _cli(capsys, "status", str(out))
    assert code == 0 and "state.json cannot be read" in err


def test_a_config_that_is_not_utf8_is_exit_2(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_bytes(b"default_variant: \xff\xfe\n")
    code, _, err = _cli(capsys, "validate", str(tmp_path / "m.parquet"), "--config", str(config))
    assert code == 2 and "not UTF-8" in err and "Traceback" not in err


def test_invalid_utf8_in_any_column_is_exit_2_before_anything_renders(tmp_path, tiny_models, capsys):
    good = [b"a shelf", b"a lamp", b"a mug"]
    bad = [b"SKU-1", b"SKU-\xff2", b"SKU-3"]  # a passthrough column, its second row broken
    table = pa.table({"id": ["a", "b", "c"],
                      "prompt": pa.Array.from_buffers(pa.string(), 3, pa.array(good, pa.binary()).buffers()),
                      "sku": pa.Array.from_buffers(pa.string(), 3, pa.array(bad, pa.binary()).buffers())})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    config = str(write_config(tmp_path / "job.yaml", tiny_models))
    for command in (["validate", str(path)], ["render", str(path), "--output", str(tmp_path / "out"),
                                               "--config", config, "--executor", "local", "--no-progress"]):
        code, _, err = _cli(capsys, *command)
        assert code == 2, err
        assert "row 1" in err and "'sku'" in err and "UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "images").exists()


def test_a_repair_cut_off_after_its_claim_leaves_a_row_that_is_not_done(tmp_path, tiny_models):
    """`render --verify` claims a broken row (its marker becomes a placeholder), then dies
    before the repair lands. The row is out of the checkpoint before the claim, so `status`
    does not count it and a plain re-run renders it (before: reported skipped, exit 0, while
    `verify` called it broken)."""
    cfg, out, uri = _rendered(tmp_path, tiny_models)
    store = LocalStore(out)
    (out / "images" / "r1.png").write_bytes(b"rot")  # broken behind our back

    def dies_after_the_claim(spec):
        worker = shared_worker(spec)
        inner = worker.ledger.store

        class Cut(type(inner)):
            def put(self, key, data, **kw):
                if key.startswith(layout.IMAGES):
                    raise RuntimeError("the process died here (injected)")
                return super().put(key, data, **kw)

        worker.ledger.store = Cut(inner.root)
        return worker

    summary, code = render(uri, str(out), cfg, factory=dies_after_the_claim, verify_first="shallow")
    assert code == 1  # the repair could not land
    assert json.loads(store.get("meta/r1.json")).get("repairing")  # claimed, not repaired
    assert output_status(str(out)).committed == 3
    summary, code = render(uri, str(out), cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (1, 3)


def test_render_verify_leaves_no_lock_files(tmp_path, tiny_models):
    cfg, out, uri = _rendered(tmp_path, tiny_models)
    (out / "images" / "r2.png").write_bytes(b"rot")
    assert render(uri, str(out), cfg, verify_first="deep")[1] == 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".lock")]


@pytest.mark.subprocess  # mounts a tmpfs: the disk really fills
def test_a_full_disk_is_exit_75_naming_the_path_with_the_lease_released(tmp_path, tiny_models):
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.fail("cannot mount a tmpfs here (the test needs root)")
    try:
        cfg, out = job(tiny_models), mount / "out"
        uri = manifest(tmp_path / "m.parquet", rows(6) + [dict(r, id=f"big{i}", width=512, height=512)
                                                          for i, r in enumerate(rows(40))])
        summary, code = render(uri, str(out), cfg.model_copy(update={"run": cfg.run.model_copy(
            update={"unreachable_after_s": 1.0})}))
        assert code == 75, summary
        assert str(mount) in summary["stopped"] and "No space left on device" in summary["stopped"]
        assert not [p for p in out.rglob(".*.tmp")]  # no temporary left behind
        lease = json.loads((out / "_job" / "lease.json").read_text())
        assert lease["released"]
    finally:
        subprocess.run(["umount", "-l", str(mount)])

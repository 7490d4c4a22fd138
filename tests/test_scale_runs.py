"""Runs, `status` and `verify` on the committed set at scale (docs/scale.md), on small data:
a manifest edited between runs renders exactly what changed; duplicate ids are rejected row by
row and the scan that found them is kept for the next run over the same bytes; `status`
counted a byte per row agrees with the exact count; `verify` sharded through the executor seam,
and sampled, finds what the full audit finds; a run's errors stream into its table."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from helpers import write_manifest
from localrun import job, manifest, render, rows

from klein_ray.cli import main
from klein_ray.commands import status, verify
from klein_ray.commands.status import output_status
from klein_ray.commands.verify import verify_output
from klein_ray.config import JobConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.schema import row_digest, setup_group
from klein_ray.output import errors as errors_module
from klein_ray.output import layout
from klein_ray.output.audit import broken_bound
from klein_ray.output.checkpoint import Origin
from klein_ray.output.errors import ErrorLog
from klein_ray.output.joblog import JobLog, errors_head
from klein_ray.output.layout import meta_key
from klein_ray.output.ledger import Ledger
from klein_ray.scheduling import resume
from klein_ray.storage import LocalStore
from klein_ray.types import RowError, RowResult


def _commits(store) -> dict[str, str]:
    return {o.key: json.loads(store.get(o.key))["commit"] for o in store.list("meta/")}


def test_an_edited_manifest_renders_exactly_what_changed(tmp_path, tiny_models):
    cfg, out = job(tiny_models), str(tmp_path / "out")
    table = rows(6)
    uri = manifest(tmp_path / "m.parquet", table)
    assert render(uri, out, cfg)[1] == 0
    store = LocalStore(out)
    before = _commits(store)
    part = pq.read_table(next(store.root.glob("_job/results/*.parquet")))
    assert sorted(part.column("row").to_pylist()) == list(range(6)) and part.column("tag").null_count == 0

    table[2]["prompt"] = "the same product, now on a marble table"  # stale
    edited = (table + rows(2, prefix="n"))[::-1]  # two rows added, all reordered
    manifest(tmp_path / "m.parquet", edited)
    summary, code = render(uri, out, cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (3, 5)
    after = _commits(store)
    assert {k for k in before if before[k] != after[k]} == {meta_key("r2")}
    assert set(after) - set(before) == {meta_key("n0"), meta_key("n1")}
    summary, code = render(uri, out, cfg)  # everything current now, found by position
    assert code == 0 and (summary["committed"], summary["skipped"]) == (0, 8)


def test_duplicate_ids_are_rejected_and_the_scan_is_kept(tmp_path, tiny_models, monkeypatch):
    cfg, out = job(tiny_models), str(tmp_path / "out")
    root = tmp_path / "m"
    manifest(root / "a.parquet", rows(3) + rows(1, prefix="dup"))
    manifest(root / "b.parquet", rows(2, prefix="dup") + rows(2, prefix="b"))
    summary, code = render(str(root), out, cfg)
    assert code == 1 and (summary["failed"], summary["committed"]) == (2, 6)
    failed = pq.read_table(LocalStore(out).root / layout.ERRORS).to_pylist()
    assert sorted((e["id"], e["manifest_file"].rsplit("/", 1)[-1], e["manifest_row"], e["error_type"])
                  for e in failed) == [("dup0", "a.parquet", 3, "DuplicateId"), ("dup0", "b.parquet", 0, "DuplicateId")]

    def scanned_again(*args, **kwargs):
        raise AssertionError("the manifest's bytes are unchanged: its scan is read, not made again")
    monkeypatch.setattr(resume, "find_duplicates", scanned_again)
    summary, code = render(str(root), out, cfg)
    assert code == 1 and (summary["failed"], summary["skipped"], summary["committed"]) == (2, 6, 0)
    monkeypatch.undo()
    manifest(root / "b.parquet", rows(2, prefix="b"))  # the duplicate gone: scanned again
    summary, code = render(str(root), out, cfg)
    assert code == 0 and (summary["committed"], summary["skipped"], summary["failed"]) == (1, 5, 0)


def _record(ledger: Ledger, path, raw: dict, at: int, setup: str = "s1") -> None:
    """``raw`` committed and recorded in the checkpoint with its origin, as a run does."""
    row_id = raw["id"]
    receipt = ledger.commit(row_id, "png", b"\x89PNG" + row_id.encode() * 20, "image/png", {"id": row_id},
                            fingerprint=row_id)
    with Manifest(str(path)) as m:
        origin = Origin(m.files[0].key, m.tags()[0], at, setup_group(raw))
    ledger.record(RowResult(id=row_id, variant="tiny", image_key=receipt.image_key, meta_key=receipt.meta_key,
                            sha256=receipt.sha256, bytes=receipt.bytes, width=64, height=64, seed=1, prompt="p",
                            timings={}, worker="w", inputs=row_digest(raw), setup=setup), origin)


def _output(tmp_path) -> tuple[str, list[dict]]:
    """An output of every kind of row: committed and checkpointed (r0-r3, r2 edited since: stale),
    committed outside the checkpoint (r4), failed in the last run (r5), not rendered (r6, r7),
    a foreign row (zzz, checkpointed), a marker that commits nothing (r7)."""
    uri = str(tmp_path / "out")
    table = rows(8)
    path = write_manifest(tmp_path / "m.parquet", table)
    ledger = Ledger(LocalStore(uri))
    for at in range(4):
        _record(ledger, path, table[at], at)
    _record(ledger, write_manifest(tmp_path / "other.parquet", rows(1, prefix="zzz")), rows(1, prefix="zzz")[0], 0)
    ledger.checkpoint.flush()
    ledger.commit("r4", "png", b"\x89PNG r4", "image/png", {"id": "r4"}, fingerprint="r4")
    ledger.store.put("meta/r7.json", b"garbage")
    table[2]["prompt"] = "edited since"
    write_manifest(path, table)
    ledger.store.put(layout.STATE, json.dumps({"manifest": str(path), "total": 8, "default_variant": "tiny",
                                               "setups": {"tiny": "s1"}}).encode())
    errors = ErrorLog("run")
    errors.append(RowError("r5", "render", "Boom", "it broke", 3, str(path), 5))
    JobLog(ledger.store, JobConfig(variants={"tiny": VariantConfig(source="m")}), str(path), "run").finish(
        errors, {"failed": 1}, 4, False)
    return uri, table


@pytest.mark.parametrize("lookups, listing", [(2000, 10**6), (0, 10**6), (0, 0)])
def test_status_counted_by_position_agrees_with_the_exact_count(tmp_path, monkeypatch, lookups, listing):
    uri, _ = _output(tmp_path)
    exact = output_status(uri)
    assert exact.counts() == {"committed": 5, "failed": 1, "remaining": 3, "foreign": 1, "unreadable": 1,
                              "stale": 1, "outdated": 0}
    monkeypatch.setattr(status, "JUDGE_LIMIT", 0)  # counted as a large output is
    monkeypatch.setattr(status, "LOOKUP_LIMIT", lookups)
    monkeypatch.setattr(status, "LIST_LIMIT", listing)
    found = output_status(uri)
    if listing or lookups:
        assert found.counts() == exact.counts()
        assert ("lookups" in found.requests) == bool(lookups)
    else:  # the rows outside the checkpoint are not looked at: said so, counted as not committed
        assert "not looked up" in found.requests
        assert found.counts() == dict(exact.counts(), committed=4, remaining=4, unreadable=0)


def test_verify_sharded_through_the_executor_finds_what_the_whole_audit_finds(tmp_path, monkeypatch):
    uri, _ = _output(tmp_path)
    LocalStore(uri).delete("images/r1.png")
    whole = verify_output(uri)
    monkeypatch.setattr(verify, "SHARD", 2)
    executor = InProcessExecutor()
    try:
        sharded = verify_output(uri, executor=executor)
    finally:
        executor.shutdown([])
    lines = list(sharded.lines())
    assert lines == list(whole.lines()) and sharded.as_dict() == whole.as_dict()
    assert [line.split("\t")[0] for line in lines] == ["r1", "r7", "r2"]  # broken, broken, stale
    assert sharded.as_dict() == {"checked": 7, "broken": 2, "deep": False, "stale": 1, "outdated": 0}


def test_verify_sample_is_seeded_and_says_what_it_sampled(tmp_path, capsys):
    uri, _ = _output(tmp_path)
    runs = []
    for _ in range(2):
        code = main(["verify", uri, "--sample", "4", "--seed", "7"])
        out = capsys.readouterr().out.strip().splitlines()
        runs.append((code, out[:-1], json.loads(out[-1])))
    assert runs[0] == runs[1]  # the same draw
    code, lines, summary = runs[0]
    sample = summary["sample"]
    assert summary["checked"] == sample["sampled"] == 4 and sample["population"] == 7 and sample["seed"] == 7
    assert "uniform without replacement" in sample["method"]
    assert sample["broken_fraction_upper_95"] == pytest.approx(broken_bound(summary["broken"], 4), abs=1e-6)
    assert broken_bound(0, 4) == pytest.approx(1 - 0.05 ** (1 / 4), abs=1e-9)
    assert code == (1 if summary["broken"] else 0)


def test_a_runs_errors_stream_into_their_table_and_the_report_lists_the_first(tmp_path, monkeypatch):
    monkeypatch.setattr(errors_module, "FLUSH", 3)
    monkeypatch.setattr(errors_module, "KEEP", 4)
    store = LocalStore(tmp_path / "out")
    errors = ErrorLog("run-1", flagged=lambda e: e.stage == "store", tmp_dir=str(tmp_path))
    for i in range(11):
        errors.append(RowError(f"r{i}", "store" if i % 5 == 0 else "render", "Boom", f"broke {i}", 1, "m", i))
    assert (len(errors), errors.flagged, len(errors.first)) == (11, 3, 4)
    JobLog(store, JobConfig(variants={"tiny": VariantConfig(source="m")}), "m", "run-1").finish(
        errors, {"failed": 11}, 0, False)
    table = pq.read_table(store.root / layout.ERRORS)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(11)]
    assert set(table.column("run_id").to_pylist()) == {"run-1"}
    first, total = errors_head(store, 6)
    assert [e.id for e in first] == [f"r{i}" for i in range(6)] and total == 11
    page = store.get(layout.REPORT).decode()
    assert "The first 4 of 11 failed rows" in page and "broke 3" in page and "broke 4" not in page
    errors.close()


@pytest.mark.slow
def test_verify_runs_its_shards_as_ray_tasks(tmp_path, monkeypatch, ray_address):
    from klein_ray.executors.ray_cluster import RayExecutor

    uri, _ = _output(tmp_path)
    LocalStore(uri).delete("images/r3.png")
    monkeypatch.setattr(verify, "SHARD", 3)
    executor = RayExecutor(ray_address)
    try:
        found = verify_output(uri, executor=executor)
    finally:
        executor.shutdown([])
    assert [line.split("\t")[0] for line in found.lines()] == ["r3", "r7", "r2"]
    assert found.as_dict()["checked"] == 7

"""A marker commits its own row only: one that names another row's image (two rows' markers
swapped, or one row's copied over another's) commits nothing, for every caller of the ledger's
predicate: `verify` and `verify --deep`, `status`, the worker's skip check on resume, and
`render --verify-deep`, which renders the rows again. Local and S3 (moto) outputs; the tiny
real model on the in-process executor. (Before: every one of them called such an output
sound, since nothing compared the marker's id or image key with the row.)"""

from __future__ import annotations

import json

import pytest
from localrun import job, manifest, render, rows

from klein_ray.cli import main
from klein_ray.commands.status import output_status
from klein_ray.output.layout import RESULTS, meta_key
from klein_ray.storage import open_store


@pytest.fixture(params=["local", "moto"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3_env")(request.getfixturevalue("moto_s3"))
    return f"s3://{server.new_bucket()}/out"


def _damage(store) -> None:
    """r0 and r1 swap markers; r2's marker is copied over r3's. r4 stays sound."""
    m = {i: store.get(meta_key(f"r{i}")) for i in range(4)}
    store.put(meta_key("r0"), m[1])
    store.put(meta_key("r1"), m[0])
    store.put(meta_key("r3"), m[2])


def _verify(capsys, out: str, *flags: str) -> tuple[int, set[str]]:
    code = main(["verify", out, *flags])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, {line.split("\t")[0] for line in lines[:-1]}


def test_every_caller_of_the_predicate_refuses_a_marker_of_another_row(tmp_path, tiny_models, out, capsys):
    cfg = job(tiny_models)
    uri = manifest(tmp_path / "m.parquet", rows(5))
    assert render(uri, out, cfg)[1] == 0
    store = open_store(out)
    _damage(store)

    assert _verify(capsys, out) == (1, {"r0", "r1", "r3"})
    assert _verify(capsys, out, "--deep") == (1, {"r0", "r1", "r3"})
    assert output_status(out).committed == 2  # a small output is judged row by row

    # Resume: the checkpoint is gone (a driver killed before it flushed), so every row goes to
    # a worker, whose skip check is the predicate: the three are rendered again, two skipped.
    for obj in list(store.list(RESULTS)):
        store.delete(obj.key)
    summary, code = render(uri, out, cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (3, 2)
    for i in range(5):
        assert json.loads(store.get(meta_key(f"r{i}")))["id"] == f"r{i}"
    assert _verify(capsys, out, "--deep") == (0, set())


def test_render_verify_deep_repairs_markers_of_other_rows(tmp_path, tiny_models, out, capsys):
    cfg = job(tiny_models)
    uri = manifest(tmp_path / "m.parquet", rows(5))
    assert render(uri, out, cfg)[1] == 0
    store = open_store(out)
    _damage(store)
    assert render(uri, out, cfg)[0]["committed"] == 0  # a plain resume trusts its checkpoint
    summary, code = render(uri, out, cfg, verify_first="deep")
    assert code == 0 and summary["committed"] == 3
    assert _verify(capsys, out, "--deep") == (0, set())
    assert output_status(out).committed == 5

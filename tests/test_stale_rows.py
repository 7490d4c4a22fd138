"""An edited row is rendered again: a committed row counts as done only for the values it was
rendered from. A catalog team changes one row's prompt and renders into the same output: that
row is stale (`status` and `verify` say so), `render` renders it again and its new commit
replaces the old one; the others are skipped. A changed setup of a variant (here the PNG
encoding) is reported as outdated and kept, until `--rerender-outdated` asks. (Before: "28
committed already, 0 to render"; the marker kept the old prompt.)"""

from __future__ import annotations

import json

from localrun import job, manifest, render, rows

from klein_ray.cli import main
from klein_ray.commands.status import output_status
from klein_ray.output.layout import meta_key
from klein_ray.storage import LocalStore


def _verify_lines(capsys, out: str) -> tuple[int, list[str], dict]:
    code = main(["verify", out])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines[:-1], json.loads(lines[-1])


def test_an_edited_row_is_stale_and_rendered_again(tmp_path, tiny_models, capsys):
    cfg, out = job(tiny_models), str(tmp_path / "out")
    table = rows(4)
    uri = manifest(tmp_path / "m.parquet", table)
    assert render(uri, out, cfg)[1] == 0
    store = LocalStore(out)
    before = {i: json.loads(store.get(meta_key(f"r{i}"))) for i in range(4)}

    table[2]["prompt"] = "the same product, now on a marble table"
    manifest(tmp_path / "m.parquet", table)
    st = output_status(out)
    assert (st.committed, st.stale, st.remaining) == (4, 1, 1)
    code, lines, summary = _verify_lines(capsys, out)
    assert code == 0 and summary["stale"] == 1 and lines == [lines[0]] and lines[0].startswith("r2\tstale")

    summary, code = render(uri, out, cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (1, 3)
    after = {i: json.loads(store.get(meta_key(f"r{i}"))) for i in range(4)}
    assert after[2]["prompt"] == table[2]["prompt"] and after[2]["commit"] != before[2]["commit"]
    assert after[2]["image"]["sha256"] != before[2]["image"]["sha256"]
    assert all(after[i] == before[i] for i in (0, 1, 3))
    assert output_status(out).stale == 0
    assert render(uri, out, cfg)[0]["committed"] == 0  # current now: nothing more to do


def test_a_stale_row_outside_the_checkpoint_is_caught_by_the_worker(tmp_path, tiny_models):
    """The driver killed before its checkpoint flushed: the worker's marker check compares the
    marker's inputs with the row's."""
    cfg, out = job(tiny_models), str(tmp_path / "out")
    table = rows(3)
    uri = manifest(tmp_path / "m.parquet", table)
    assert render(uri, out, cfg)[1] == 0
    store = LocalStore(out)
    for obj in list(store.list("_job/results/")):
        store.delete(obj.key)
    table[0]["seed"] = 99
    manifest(tmp_path / "m.parquet", table)
    summary, code = render(uri, out, cfg)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (1, 2)
    assert json.loads(store.get(meta_key("r0")))["seed"] == 99


def test_a_changed_setup_is_reported_and_rerendered_only_when_asked(tmp_path, tiny_models, capsys):
    out = str(tmp_path / "out")
    uri = manifest(tmp_path / "m.parquet", rows(3))
    assert render(uri, out, job(tiny_models, png_level=1))[1] == 0
    changed = job(tiny_models, png_level=6)
    summary, code = render(uri, out, changed)
    assert code == 0 and (summary["committed"], summary["skipped"]) == (0, 3)  # kept
    st = output_status(out)
    assert (st.committed, st.outdated, st.stale, st.remaining) == (3, 3, 0, 0)
    code, lines, found = _verify_lines(capsys, out)
    assert code == 0 and found["outdated"] == 3 and all("\toutdated" in line for line in lines)
    summary, code = render(uri, out, changed, rerender_outdated=True)
    assert code == 0 and summary["committed"] == 3
    assert output_status(out).outdated == 0

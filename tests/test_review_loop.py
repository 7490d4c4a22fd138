"""The review loop without a browser: a catalog of reference edits rendered on the tiny model keeps
each edit's reference thumbnails for the report; `klein-ray reroll` turns a rejects file into the
rows to render again (new ids that say the attempt, new seeds, every other column kept), whose
render lands beside the first pass and overwrites nothing; `klein-ray report` groups the page
by a column. The page itself, clicked in Chromium: test_review_browser.py."""

from __future__ import annotations

import io
import json
import re

import pyarrow.parquet as pq
import pytest
from localrun import job, render
from PIL import Image
from reviewrun import PRODUCTS, catalog_run

from klein_ray.cli import main
from klein_ray.intake.rows import derive_seed
from klein_ray.output.joblog import read_contact
from klein_ray.output.review import REJECTS_KIND
from klein_ray.storage import LocalStore


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models):
    """One rendered catalog for the tests that only read it (rerolls write elsewhere)."""
    done = catalog_run(tmp_path_factory.mktemp("catalog"), tiny_models)
    assert done.code == 0, done.summary
    return done


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rejects_file(path, out, ids: list[str]):
    path.write_text(json.dumps({"kind": REJECTS_KIND, "version": 1, "output": str(out), "rejected": ids}))
    return path


def test_each_edit_keeps_its_reference_thumbnails(run):
    entries = {e.id: e for e in read_contact(LocalStore(run.out))}
    assert sorted(entries) == sorted(r["id"] for r in run.rows)
    for row in run.rows:
        entry, sku = entries[row["id"]], row["sku"]
        if sku not in run.photo_sha:  # the lamp: text-to-image, nothing to show beside it
            assert entry.reference_sha256 == [] and entry.reference_thumbnails == []
            continue
        assert entry.reference_sha256 == [run.photo_sha[sku]]
        with Image.open(io.BytesIO(entry.reference_thumbnails[0])) as thumb:
            assert thumb.format == "JPEG" and thumb.size == (96, 80)  # the photo's size: never upscaled


@pytest.mark.slow
def test_reroll_writes_the_rejected_rows_again_and_the_second_pass_lands_beside_the_first(tmp_path, tiny_models, capsys):
    run = catalog_run(tmp_path / "first", tiny_models)  # its own: this test renders into it again
    capsys.readouterr()
    rejected = ["VASE-2-beach-0", "MUG-1-marble-0"]
    rejects = rejects_file(tmp_path / "rejects.json", run.out, rejected)
    code, out, err = cli(capsys, "reroll", run.out, rejects, "--output", tmp_path / "second.parquet")
    assert code == 0, err
    assert out.splitlines()[:2] == ["MUG-1-marble-0\tMUG-1-marble-0.r2", "VASE-2-beach-0\tVASE-2-beach-0.r2"]
    second = pq.ParquetFile(tmp_path / "second.parquet").read().to_pylist()
    originals = {r["id"]: r for r in run.rows}
    assert [r["id"] for r in second] == ["MUG-1-marble-0.r2", "VASE-2-beach-0.r2"]  # the manifest's order
    for row in second:
        before = originals[row["id"].removesuffix(".r2")]
        assert row["seed"] == derive_seed(row["id"]) != before["seed"]
        assert {k: v for k, v in row.items() if k not in ("id", "seed")} == \
               {k: v for k, v in before.items() if k not in ("id", "seed")}

    store = LocalStore(run.out)
    first_pass = {o.key: store.get(o.key) for p in ("images/", "meta/") for o in store.list(p)}
    summary, code = render(str(tmp_path / "second.parquet"), str(run.out), job(tiny_models))
    assert code == 0 and summary["committed"] == 2
    assert {k: store.get(k) for k in first_pass} == first_pass  # nothing of the first pass replaced
    assert {f"images/{i}.png" for i in ("MUG-1-marble-0.r2", "VASE-2-beach-0.r2")} <= {o.key for o in store.list("images/")}

    # The state names the second pass now: a first-pass id is found with --manifest, and its next
    # attempt skips .r2 (committed in OUT).
    again = rejects_file(tmp_path / "again.json", run.out, ["MUG-1-marble-0"])
    code, _, err = cli(capsys, "reroll", run.out, again, "--output", tmp_path / "third.parquet")
    assert code == 2 and "'MUG-1-marble-0' is not row(s) of" in err and "--manifest" in err
    code, out, err = cli(capsys, "reroll", run.out, again, "--output", tmp_path / "third.parquet",
                         "--manifest", run.manifest)
    assert code == 0, err
    assert out.splitlines()[0] == "MUG-1-marble-0\tMUG-1-marble-0.r3"
    # And an attempt's own next attempt: .r2 -> .r3 (from the state's manifest).
    code, out, _ = cli(capsys, "reroll", run.out, rejects_file(tmp_path / "r2.json", run.out, ["VASE-2-beach-0.r2"]),
                       "--output", tmp_path / "fourth.parquet")
    assert code == 0 and out.splitlines()[0] == "VASE-2-beach-0.r2\tVASE-2-beach-0.r3"


@pytest.mark.parametrize("content, reason", [
    ('{"kind": "klein-ray rejects", "version": 1, "rejected": ["NOPE-1"]}', "'NOPE-1' is not row(s) of"),
    ('{"kind": "klein-ray rejects", "version": 1, "rejected": ["../x"]}', "not valid row id(s)"),
    ('{"kind": "klein-ray rejects", "version": 1, "rejected": []}', "no rejected ids"),
    ('{"kind": "klein-ray rejects", "version": 7, "rejected": ["MUG-1-beach-0"]}', "version 7"),
    ('{"kind": "something else", "rejected": ["MUG-1-beach-0"]}', "not a klein-ray rejects file"),
    ('{"kind": "klein-ray rejects", "version": 1, "rejected": "MUG-1-beach-0"}', "must be a list of ids"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_rejects_file_is_exit_2_and_writes_nothing(run, tmp_path, capsys, content, reason):
    (tmp_path / "rejects.json").write_text(content)
    code, _, err = cli(capsys, "reroll", run.out, tmp_path / "rejects.json", "--output", tmp_path / "m2.parquet")
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m2.parquet").exists()


def test_rejects_as_plain_ids_and_an_id_with_no_room_for_its_attempt(run, tmp_path, capsys):
    (tmp_path / "ids.txt").write_text("# reviewed on Monday\nLAMP-3-beach-0\n\nLAMP-3-beach-0\n")
    code, out, err = cli(capsys, "reroll", run.out, tmp_path / "ids.txt", "--output", tmp_path / "m2.parquet")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["rows"] == 1  # listed twice, rerolled once

    long_id = "L" * 127
    table = pq.ParquetFile(run.manifest).read().to_pylist()
    table[0]["id"] = long_id
    pq.write_table(pq.ParquetFile(run.manifest).read().from_pylist(table, schema=pq.ParquetFile(run.manifest).schema_arrow),
                   tmp_path / "long.parquet")
    (tmp_path / "long.txt").write_text(long_id + "\n")
    code, _, err = cli(capsys, "reroll", run.out, tmp_path / "long.txt", "--output", tmp_path / "m3.parquet",
                       "--manifest", tmp_path / "long.parquet")
    assert code == 2 and "no room for its attempt suffix '.r2' within the 128-character id limit" in err
    assert not (tmp_path / "m3.parquet").exists()


def test_the_report_command_groups_the_page_by_a_column(run, tmp_path, capsys):
    page = tmp_path / "review.html"
    code, out, err = cli(capsys, "report", run.out, "--group-by", "sku", "--output", page)
    assert code == 0, err
    assert json.loads(out) == {"report": str(page), "images": 6, "groups": 3}
    html = page.read_text()
    assert re.findall(r'<section class="group" data-group="([^"]+)"', html) == sorted(PRODUCTS)
    assert re.findall(r'data-id="(MUG-1[^"]*)"', html) == ["MUG-1-beach-0", "MUG-1-marble-0"]
    assert html.count('class="ref"') == 4  # the mug's and the vase's edits, two scenes each
    assert html.count("data:image/jpeg;base64,") == 6 + 2  # six images, two distinct photos once each

    code, _, err = cli(capsys, "report", run.out, "--group-by", "colour")
    assert code == 2 and "no image of the report has that column" in err and "scene, sku" in err
    code, _, err = cli(capsys, "report", tmp_path / "nothing-here")
    assert code == 2 and "no klein-ray output" in err

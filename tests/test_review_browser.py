"""The catalog loop end to end, with a reviewer in headless Chromium: a catalog of reference
edits expanded and rendered on the tiny model; the report page, grouped by sku, shows each edit
beside its reference thumbnail; clicking Reject on two shots and Download gives the rejects file
that `klein-ray reroll` turns into the expected manifest (checked row by row); its render lands
beside the first pass, and the page built again shows the new attempts and what they replaced."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from browser import review_in_chromium
from localrun import job, render
from reviewrun import PRODUCTS, catalog_run

from klein_ray.cli import main
from klein_ray.intake.rows import derive_seed
from klein_ray.output.review import REJECTS_KIND
from klein_ray.storage import LocalStore


@pytest.mark.slow  # two renders and two browsers: tens of seconds on a shared machine
def test_a_reviewer_rejects_shots_in_the_page_and_reroll_renders_them_again(tmp_path, tiny_models, chromium, capsys):
    run = catalog_run(tmp_path, tiny_models, group_by="sku")
    assert run.code == 0, run.summary
    rejected = ["VASE-2-marble-0", "MUG-1-beach-0"]

    seen = review_in_chromium(run.out / "_job" / "report.html", rejected, tmp_path / "downloads")

    before, after = seen["before"], seen["after"]
    cards = {c["id"]: c for c in before["cards"]}
    assert sorted(cards) == sorted(r["id"] for r in run.rows)
    # Each edit beside its reference, drawn (decoded, on screen); the text-to-image rows have none.
    for row in run.rows:
        refs = cards[row["id"]]["refs"]
        if row["sku"] in run.photo_sha:
            assert len(refs) == 1 and refs[0]["loaded"] and refs[0]["shown"], (row["id"], refs)
            assert (refs[0]["width"], refs[0]["height"]) == (96, 80)
        else:
            assert refs == []
    # The groups: one per sku, in order, each holding its product's shots.
    assert before["groups"] == [f"sku: {sku} (2)" for sku in sorted(PRODUCTS)]
    assert all(c["group"] == c["id"].rsplit("-", 2)[0] for c in before["cards"])
    assert before["count"] == "0" and not any(c["rejected"] for c in before["cards"])
    assert after["count"] == "2"
    assert sorted(c["id"] for c in after["cards"] if c["rejected"]) == sorted(rejected)

    # The file the click downloaded: the page's ids in page order, and the output they came from.
    assert seen["file"] is not None and seen["file"].name == "rejects.json"
    rejects = json.loads(seen["file"].read_text())
    assert rejects["kind"] == REJECTS_KIND and rejects["output"] == str(run.out)
    assert rejects["rejected"] == ["MUG-1-beach-0", "VASE-2-marble-0"]

    capsys.readouterr()
    assert main(["reroll", str(run.out), str(seen["file"]), "--output", str(tmp_path / "second.parquet")]) == 0
    second = pq.ParquetFile(tmp_path / "second.parquet").read().to_pylist()
    originals = {r["id"]: r for r in run.rows}
    assert [r["id"] for r in second] == ["MUG-1-beach-0.r2", "VASE-2-marble-0.r2"]
    for row in second:
        before_row = originals[row["id"].removesuffix(".r2")]
        expected = dict(before_row, id=row["id"], seed=derive_seed(row["id"]))
        assert row == expected

    summary, code = render(str(tmp_path / "second.parquet"), str(run.out), job(tiny_models))
    assert code == 0 and summary["committed"] == 2
    store = LocalStore(run.out)
    assert {o.key for o in store.list("meta/")} == {f"meta/{i}.json" for i in [*originals, "MUG-1-beach-0.r2",
                                                                              "VASE-2-marble-0.r2"]}
    page = tmp_path / "second-review.html"
    assert main(["report", str(run.out), "--group-by", "sku", "--output", str(page)]) == 0
    seen = chromium(page)
    assert seen["loaded"] == seen["images"] and not seen["broken"]
    assert seen["thumbs"] == 8 and "attempt 2" in seen["text"] and "superseded by MUG-1-beach-0.r2" in seen["text"]

"""`klein-ray export`: the committed rows of an output become WebDataset shards or a Hugging Face
Parquet dataset that the real `webdataset` and `datasets` libraries load with no glue: every
committed row exactly once, its image byte for byte, its prompt as caption; every other row in
the per-shard tables with why (failed with stage and error, rejected, pending). Local outputs,
rendered with the tiny model on the in-process executor."""

from __future__ import annotations

import json

import pytest
from exportcheck import committed, datasets_rows, shard_tables, webdataset_samples

from klein_ray.cli import main
from klein_ray.commands.export import export_output


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_every_committed_row_exactly_once(export_source, fmt, tmp_path, capsys):
    out, table = export_source
    dest = tmp_path / fmt
    code = main(["export", out, "--format", fmt, "--to", str(dest), "--rows-per-shard", "4", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert (summary["shards"], summary["built"], summary["samples"]) == (3, 3, 8)
    assert (summary["failed"], summary["rejected"], summary["pending"]) == (1, 2, 0)
    truth = committed(out)
    assert len(truth) == 8 and "dotted.id.v0" in truth and truth["jpeg0"]["ext"] == "jpg"

    loaded = datasets_rows(dest, tmp_path / "hf-cache")
    if fmt == "webdataset":
        samples = webdataset_samples(dest)
        assert samples.keys() == truth.keys()
        for row_id, sample in samples.items():
            assert sample["image"] == truth[row_id]["image"] and sample["prompt"] == truth[row_id]["prompt"]
            assert "." not in sample["key"] and sample["meta"]["seed"] == truth[row_id]["seed"]
        assert len({tuple(sorted(s["meta"])) for s in samples.values()}) == 1  # same keys in every sample
        by_id = {r["json"]["id"]: r for r in loaded}
        images = {i: (r["png"] or r["jpg"])["bytes"] for i, r in by_id.items()}
        captions = {i: r["txt"] for i, r in by_id.items()}
    else:
        by_id = {r["id"]: r for r in loaded}
        images = {i: r["image"]["bytes"] for i, r in by_id.items()}
        captions = {i: r["prompt"] for i, r in by_id.items()}
        assert by_id["r0"]["passthrough"] == {"sku": None, "priority": None}
        assert (by_id["jpeg0"]["format"], by_id["r3"]["width"], by_id["r3"]["seed"]) == ("jpeg", 64, 3)
    assert len(loaded) == 8 and by_id.keys() == truth.keys()
    assert all(images[i] == truth[i]["image"] and captions[i] == truth[i]["prompt"] for i in truth)


def test_other_rows_are_recorded_beside_the_shards(export_source, tmp_path):
    out, table = export_source
    dest = tmp_path / "wds"
    export_output(out, "webdataset", str(dest), rows_per_shard=4)
    listed = shard_tables(dest)
    assert [r["position"] for r in listed] == list(range(len(table)))
    assert [r["id"] for r in listed] == [r["id"] for r in table]
    status = {(r["id"], r["position"]): r for r in listed}
    failed = status[("edit0", 7)]
    assert failed["status"] == "failed" and failed["stage"] and failed["error_type"]
    assert "ref.png" in failed["message"] and failed["file"] is None
    assert {r["status"] for r in listed if r["id"] == "dup0"} == {"rejected"}
    assert all("more than once" in r["message"] for r in listed if r["id"] == "dup0")
    assert status[("r4", 8)]["file"] == "00002.tar" and status[("r4", 8)]["status"] == "exported"
    index = json.loads((dest / "shardindex.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [("00000.tar", 3), ("00001.tar", 3),
                                                                      ("00002.tar", 2)]
    assert all(s["filesize"] == (dest / s["url"]).stat().st_size for s in index["shardlist"])


def test_a_rerun_with_nothing_changed_skips_every_shard(export_source, tmp_path):
    out, _ = export_source
    dest = tmp_path / "pq"
    first = export_output(out, "parquet", str(dest), rows_per_shard=4)
    names = sorted(p.name for p in (dest / "data").iterdir())
    assert names == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    again = export_output(out, "parquet", str(dest), rows_per_shard=4)
    assert (first.built, again.built, again.skipped, again.samples) == (3, 0, 3, 8)


def test_max_shard_bytes_splits_a_shard_into_parts_deterministically(export_source, tmp_path):
    out, _ = export_source
    truth = committed(out)
    cap = max(len(t["image"]) for t in truth.values()) + 4096  # about one sample a part
    dest = tmp_path / "parts"
    summary = export_output(out, "webdataset", str(dest), rows_per_shard=4, max_shard_bytes=cap)
    index = json.loads((dest / "shardindex.json").read_text())
    assert summary.files > 3 and all("_" in s["url"] for s in index["shardlist"])
    assert webdataset_samples(dest).keys() == truth.keys()
    # Back to whole shards: the parts are removed, nothing is read twice.
    export_output(out, "webdataset", str(dest), rows_per_shard=4)
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert webdataset_samples(dest).keys() == truth.keys()


def test_bad_invocations_exit_2(export_source, tmp_path, capsys):
    out, _ = export_source
    dest = str(tmp_path / "d")
    assert main(["export", out, "-f", "parquet", "--to", dest, "--rows-per-shard", "0"]) == 2
    assert "--rows-per-shard must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", out, "-f", "tiff", "--to", dest])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_an_output_never_rendered_or_a_foreign_dest_exit_2(export_source, tmp_path, capsys):
    out, _ = export_source
    assert main(["export", str(tmp_path / "nothing"), "-f", "parquet", "--to", str(tmp_path / "d")]) == 2
    assert "no klein-ray output" in capsys.readouterr().err
    assert main(["export", out, "-f", "parquet", "--to", out]) == 2
    assert "not OUT itself" in capsys.readouterr().err
    export_output(out, "parquet", str(tmp_path / "d"), rows_per_shard=4)
    assert main(["export", out, "-f", "webdataset", "--to", str(tmp_path / "d")]) == 2
    assert "holds a parquet export" in capsys.readouterr().err

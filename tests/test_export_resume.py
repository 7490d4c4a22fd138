"""An export is exactly once and resumable: stopped between a shard's file and its marker, the
rerun ends byte-identical to a clean export; rows committed or repaired after an export change
only their own shards on the rerun (the others are not even rewritten)."""

from __future__ import annotations

import io
import json

import pytest
from exportcheck import StopAfter, Stopped, committed, identities, render_manifest, tree, webdataset_samples
from localrun import job, render
from PIL import Image

from klein_ray.commands.export import export_output
from klein_ray.output.export.shard import ShardBuilder
from klein_ray.storage import LocalStore


@pytest.mark.parametrize("fmt, stop_after", [
    ("webdataset", "00001.tar"),
    ("webdataset", "_shards/00001.parquet"),
    ("parquet", "data/train-00001-of-00003.parquet"),
    ("parquet", "_shards/00002_stats.json"),
])
def test_a_stopped_export_resumes_byte_identical(export_source, tmp_path, fmt, stop_after):
    rendered = export_source[0]
    clean, dest = tmp_path / "clean", tmp_path / "dest"
    export_output(rendered, fmt, str(clean), rows_per_shard=4)

    def stopping(task):
        return ShardBuilder(LocalStore(rendered), StopAfter(LocalStore(dest), stop_after)).build(task)

    with pytest.raises(Stopped):
        export_output(rendered, fmt, str(dest), rows_per_shard=4, build=stopping)
    assert (dest / stop_after).is_file() and not (dest / "shardindex.json").exists()
    if not stop_after.endswith("_stats.json"):  # the shard's marker was not written: incomplete
        shard = stop_after.split("-")[1] if fmt == "parquet" else stop_after[-9:-4]
        assert not (dest / f"_shards/{shard}_stats.json").exists()

    again = export_output(rendered, fmt, str(dest), rows_per_shard=4)
    assert again.samples == 8 and again.built >= (0 if stop_after.endswith("_stats.json") else 1)
    assert tree(dest) == tree(clean)


@pytest.mark.slow
def test_rows_committed_or_repaired_since_change_only_their_shards(tmp_path, tiny_models):
    uri, _ = render_manifest(tmp_path)
    out, dest, cfg = str(tmp_path / "out"), tmp_path / "wds", job(tiny_models)
    assert render(uri, out, cfg)[0]["committed"] == 8
    first = export_output(out, "webdataset", str(dest), rows_per_shard=4)
    assert first.failed == 1 and "edit0" not in webdataset_samples(dest)
    before, original = identities(dest), tree(dest)

    # The failed row's reference appears; the next render commits it (shard 1 only).
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buf, "PNG")
    (tmp_path / "m" / "ref.png").write_bytes(buf.getvalue())
    assert render(uri, out, cfg)[0]["committed"] == 1
    second = export_output(out, "webdataset", str(dest), rows_per_shard=4)
    assert (second.built, second.skipped, second.samples, second.failed) == (1, 2, 9, 0)
    after = identities(dest)
    for shard in ("00000", "00002"):
        for name in (f"{shard}.tar", f"_shards/{shard}.parquet", f"_shards/{shard}_stats.json"):
            assert after[name] == before[name], f"{name} was rewritten"
    assert all(after[n] != before[n] for n in ("00001.tar", "_shards/00001_stats.json"))
    assert webdataset_samples(dest).keys() == committed(out).keys()

    # r4's image is damaged: the export leaves it out (pending, why), then `render --verify`
    # repairs it and the export puts shard 2 back as it was.
    store = LocalStore(out)
    marker = json.loads(store.get("meta/r4.json"))
    (tmp_path / "out" / marker["image"]["key"]).write_bytes(b"not the image")
    third = export_output(out, "webdataset", str(dest), rows_per_shard=4)
    assert (third.built, third.pending, third.samples) == (1, 1, 8) and "r4" not in webdataset_samples(dest)
    assert render(uri, out, cfg, verify_first="shallow")[0]["committed"] == 1
    fourth = export_output(out, "webdataset", str(dest), rows_per_shard=4)
    assert (fourth.built, fourth.skipped, fourth.samples) == (1, 2, 9)
    assert tree(dest)["00002.tar"] == original["00002.tar"]  # the repaired render is the same image
    assert webdataset_samples(dest)["r4"]["image"] == committed(out)["r4"]["image"]

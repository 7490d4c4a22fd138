"""`verify` and `status` read an output as it is: every damaged row found (shallow: marker,
size, the sha256 an image carries; deep: the bytes hashed), and `status` counting only readable
markers of the job's own rows. Real stores: LocalStore and moto."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import write_manifest

from klein_ray.cli import main
from klein_ray.commands.status import output_status
from klein_ray.output import layout
from klein_ray.output.ledger import Ledger
from klein_ray.storage import LocalStore, open_store
from klein_ray.types import RowResult

IDS = ["a", "b", "c", "d"]


def _image(i: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + f"image of {i}".encode() * 30


@pytest.fixture(params=["local", "moto"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3_env")(request.getfixturevalue("moto_s3"))
    return f"s3://{server.new_bucket()}/out"


def _committed(uri: str, ids=IDS) -> Ledger:
    ledger = Ledger(open_store(uri))
    for i in ids:
        ledger.commit(i, "png", _image(i), "image/png", {"id": i}, fingerprint=i)
    return ledger


def _verify(capsys, uri: str, *flags: str) -> tuple[int, list[str], dict]:
    code = main(["verify", uri, *flags])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines[:-1], json.loads(lines[-1])


def test_verify_passes_a_sound_output(out, capsys):
    _committed(out)
    code, broken, summary = _verify(capsys, out, "--deep")
    assert (code, broken, summary) == (0, [], {"checked": 4, "broken": 0, "deep": True, "stale": 0, "outdated": 0})


def test_verify_finds_every_damaged_row(out, capsys):
    ledger = _committed(out)
    store = ledger.store
    store.delete("images/a.png")  # image gone
    store.put("meta/b.json", b"{not json")  # marker damaged
    store.put("images/c.png", b"short")  # another image, without our metadata
    code, broken, summary = _verify(capsys, out)
    assert code == 1 and summary["broken"] == 3
    problems = dict(line.split("\t", 1) for line in broken)
    assert set(problems) == {"a", "b", "c"}
    assert "missing" in problems["a"] and "JSON" in problems["b"]


def test_only_deep_verify_sees_bytes_that_lie_about_their_sha(out, capsys):
    ledger = _committed(out)
    claimed = hashlib.sha256(_image("d")).hexdigest()
    forged = _image("d")[:-1] + b"X"  # same size, other bytes, the old sha256 in metadata
    if isinstance(ledger.store, LocalStore):
        (ledger.store.root / "images" / "d.png").write_bytes(forged)
        shallow_sees_it = True  # a local store hashes on HEAD: the shallow check is exact
    else:
        ledger.store.put("images/d.png", forged, metadata={"sha256": claimed})
        shallow_sees_it = False
    assert (_verify(capsys, out)[0] == 1) is shallow_sees_it
    code, broken, _ = _verify(capsys, out, "--deep")
    assert code == 1 and broken[0].startswith("d\t")


def test_checkpointed_rows_without_marker_are_broken(tmp_path, capsys):
    uri = str(tmp_path / "out")
    ledger = _committed(uri, ["a"])
    # A checkpoint record for a row whose marker is gone: resume would skip it for ever.
    ledger.record(RowResult(id="x", variant="v", image_key="images/x.png", meta_key="meta/x.json",
                            sha256="0" * 64, bytes=1, width=1, height=1, seed=1, prompt="p",
                            timings={}, worker="w"))
    ledger.checkpoint.flush()
    code, broken, _ = _verify(capsys, uri)
    assert code == 1 and broken == ["x\tno marker (the checkpoint names the row, meta/ does not)"]


@pytest.mark.parametrize("lookups", [True, False])
def test_status_counts_only_readable_markers_of_the_manifest(tmp_path, monkeypatch, lookups):
    """Both ways of counting: the checkpoint plus a lookup of each row it does not name (few),
    or plus a listing of every marker (many)."""
    from klein_ray.commands import status

    monkeypatch.setattr(status, "LOOKUP_LIMIT", 2000 if lookups else 0)
    uri = str(tmp_path / "out")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": "p"} for i in IDS])
    ledger = _committed(uri, ["a", "b", "zzz"])  # zzz: a row of another job's manifest
    ledger.record(_result("zzz"))  # that job's checkpoint names it
    ledger.record(_result("a"))
    ledger.checkpoint.flush()
    ledger.store.put("meta/c.json", b"garbage")  # c: a marker that commits nothing
    ledger.store.put(layout.STATE, json.dumps({"manifest": str(manifest), "total": 4}).encode())
    st = output_status(uri)
    assert st.counts() == {"committed": 2, "failed": 0, "remaining": 2, "foreign": 1, "unreadable": 1,
                           "stale": 0, "outdated": 0}
    assert ("lookups" in st.requests) is lookups


def _result(i: str) -> RowResult:
    return RowResult(id=i, variant="v", image_key=f"images/{i}.png", meta_key=f"meta/{i}.json",
                     sha256="0" * 64, bytes=1, width=1, height=1, seed=1, prompt="p", timings={}, worker="w")

"""The committed set at scale stays exact (docs/scale.md): a row is marked committed only if a
checkpoint record names it, by position where its manifest file is unchanged (same bytes), by
id where the file changed; the oracle is the by-id reading of every record (``DoneSet``), which
every edit of the manifest must agree with. Ids that collide under the hashes used are still
different ids; damaged parts cost their rows, never a wrong answer; merges stream and keep each
id's newest record. Real LocalStore, real Parquet files, no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import row, write_manifest

from klein_ray.intake.manifest import Manifest
from klein_ray.intake.marks import DONE, OUTDATED, STALE, STANDING
from klein_ray.intake.prescan import find_duplicates
from klein_ray.intake.schema import MANIFEST_SCHEMA, row_digest, setup_group
from klein_ray.output import layout, parts
from klein_ray.output.checkpoint import Checkpoint, Origin
from klein_ray.scheduling.standing import build, setup_lookup
from klein_ray.storage import LocalStore, spill
from klein_ray.storage.spill import string_hashes
from klein_ray.types import RowResult

SETUPS = {"tiny": "setup-1"}
STATES = {"done": DONE, "stale": STALE, "outdated": OUTDATED}


def _rows(ids, prompt="a lamp on a desk, study {}") -> list[dict]:
    return [row(id=i, prompt=prompt.format(i), width=64, height=64) for i in ids]


def _commit(store, run: str, epoch: int, path, ids, setup: str = "setup-1", origin: bool = True) -> None:
    """Records, as a run that rendered these rows of the manifest file at ``path`` leaves them."""
    with Manifest(str(path)) as manifest:
        tag, mf = manifest.tags()[0], manifest.files[0]
        raws = pq.read_table(path).to_pylist()
        cp = Checkpoint(store, run)
        cp.epoch = epoch
        for at, raw in enumerate(raws):
            if raw["id"] not in ids:
                continue
            result = RowResult(id=raw["id"], variant="tiny", image_key=f"images/{raw['id']}.png",
                               meta_key=f"meta/{raw['id']}.json", sha256="0" * 64, bytes=1, width=64,
                               height=64, seed=1, prompt=raw["prompt"], timings={}, worker="w",
                               inputs=row_digest(raw), setup=setup)
            cp.record(result, Origin(mf.key, tag, at, setup_group(raw)) if origin else None)
        cp.flush()


def _marks(store, uri: str, setups=SETUPS) -> tuple[dict, object]:
    """{(file name, row): standing} of every row the build marked, and the build's figures."""
    with Manifest(uri) as manifest:
        found = build(Checkpoint(store, "reader"), manifest, setup_lookup(setups, {}, {}, "tiny"))
        marked = {}
        for index, mf in enumerate(manifest.files):
            for at in np.flatnonzero(found.marks.files[index] & STANDING):
                state = int(found.marks.files[index][at] & STANDING)
                marked[(mf.key, int(at))] = {v: k for k, v in STATES.items()}[state]
        return marked, found


def _oracle(store, uri: str, setups=SETUPS) -> dict:
    """The same, read by id (every record's id in memory, newest record wins)."""
    done = Checkpoint(store, "oracle").load()
    setup_of = setup_lookup(setups, {}, {}, "tiny")
    expected = {}
    with Manifest(uri) as manifest:
        for mf, at, raw in manifest.iter_rows():
            state = done.standing(raw["id"], lambda r=raw: row_digest(r), setup_of(setup_group(raw)))
            if state is not None:
                expected[(mf.key, at)] = state
    return expected


def test_an_unchanged_file_is_matched_by_position(tmp_path):
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows([f"r{i}" for i in range(10)]))
    _commit(store, "run-1", 1, path, {f"r{i}" for i in range(7)})
    marked, found = _marks(store, str(path))
    assert marked == {("m.parquet", i): "done" for i in range(7)} == _oracle(store, str(path))
    assert (found.by_position, found.by_id, found.foreign) == (7, 0, 0)


def _edit(kind: str, ids: list[str]) -> list[dict]:
    if kind == "added":
        return _rows(ids + ["r10", "r11"])
    if kind == "removed":
        return _rows([i for i in ids if i not in ("r2", "r7")])
    return _rows(ids[::-1])  # reordered


@pytest.mark.parametrize("kind", ["added", "removed", "reordered", "replaced"])
def test_a_manifest_edited_between_runs_agrees_with_the_ids(tmp_path, kind):
    store = LocalStore(tmp_path / "out")
    ids = [f"r{i}" for i in range(10)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(ids), schema=MANIFEST_SCHEMA), path, compression="none")
    _commit(store, "run-1", 1, path, set(ids[:6]))
    if kind == "replaced":  # r3's prompt edited in place: the same size, other bytes
        data = path.read_bytes()
        path.write_bytes(data.replace(b"a lamp on a desk, study r3", b"a vase on a desk, study r3"))
        assert path.stat().st_size == len(data) and path.read_bytes() != data
    else:
        write_manifest(path, _edit(kind, ids))
    marked, found = _marks(store, str(path))
    assert marked == _oracle(store, str(path))
    assert found.by_position == 0 and found.by_id == len(marked)
    assert sorted(marked.values()).count("stale") == (kind == "replaced")
    assert found.foreign == (1 if kind == "removed" else 0)  # r2's record: no row has its id now


def test_rows_moved_between_files_and_an_unchanged_file(tmp_path):
    store = LocalStore(tmp_path / "out")
    root = tmp_path / "m"
    a = write_manifest(root / "a.parquet", _rows(["a0", "a1", "a2", "a3"]))
    b = write_manifest(root / "b.parquet", _rows(["b0", "b1", "b2"]))
    c = write_manifest(root / "c.parquet", _rows(["c0", "c1"]))
    for path, ids in ((a, {"a0", "a1", "a3"}), (b, {"b1", "b2"}), (c, {"c0", "c1"})):
        _commit(store, f"run-{path.stem}", 1, path, ids)
    write_manifest(a, _rows(["a0", "a2"]))  # a1 and a3 moved to b
    write_manifest(b, _rows(["b0", "a3", "b1", "a1", "b2"]))
    marked, found = _marks(store, str(root))
    assert marked == _oracle(store, str(root))
    assert {k for k, v in marked.items() if v == "done"} == {
        ("a.parquet", 0), ("b.parquet", 1), ("b.parquet", 2), ("b.parquet", 3), ("b.parquet", 4),
        ("c.parquet", 0), ("c.parquet", 1)}
    assert found.by_position == 2  # c.parquet: the same bytes


def test_records_without_positions_are_matched_by_id(tmp_path):
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows([f"r{i}" for i in range(5)]))
    _commit(store, "run-old", 1, path, {"r1", "r3"}, origin=False)  # a part of an older version
    marked, found = _marks(store, str(path))
    assert marked == {("m.parquet", 1): "done", ("m.parquet", 3): "done"} == _oracle(store, str(path))
    assert found.by_id == 2


def test_a_changed_setup_is_outdated_by_position_and_by_id(tmp_path):
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows(["r0", "r1", "r2"]))
    _commit(store, "run-1", 1, path, {"r0", "r1"})
    _commit(store, "run-2", 1, path, {"r2"}, origin=False)
    now = {"tiny": "setup-2"}
    marked, _ = _marks(store, str(path), now)
    assert marked == {("m.parquet", i): "outdated" for i in range(3)} == _oracle(store, str(path), now)


def test_the_newest_record_of_a_row_decides_after_a_file_was_reverted(tmp_path):
    """r1 rendered (epoch 1), its prompt edited and r1 rendered again (epoch 2), then the file
    restored byte for byte: its epoch-1 record matches by position, but the image now is the
    epoch-2 render of the other prompt: stale. (No compaction merged the two records away: a
    killed run.)"""
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows(["r0", "r1", "r2"]))
    original = path.read_bytes()
    _commit(store, "20260101T000000Z-aaaaaa", 1, path, {"r0", "r1", "r2"})
    edited = _rows(["r0", "r1", "r2"])
    edited[1]["prompt"] = "a chair"
    write_manifest(path, edited)
    _commit(store, "20260102T000000Z-bbbbbb", 2, path, {"r1"})
    path.write_bytes(original)
    marked, found = _marks(store, str(path))
    assert marked == _oracle(store, str(path)) == {
        ("m.parquet", 0): "done", ("m.parquet", 1): "stale", ("m.parquet", 2): "done"}
    assert found.by_position == 3 and found.by_id == 1


def _colliding() -> tuple[str, str]:
    """Two ids string_hashes maps to the same 64 bits (HASH_BYTES is 4 in these tests: a string
    longer than 8 bytes is hashed by its length, first and last 4 bytes)."""
    return "lamp-0001-blue", "lamp-0002-blue"


@pytest.fixture
def collide(monkeypatch):
    monkeypatch.setattr(spill, "HASH_BYTES", 4)
    monkeypatch.setattr(spill, "MEMORY_ROWS", 2)  # every spill goes to disk, in several parts
    monkeypatch.setattr(spill, "PARTITION_ROWS", 3)
    first, second = _colliding()
    hashes = string_hashes(pa.array([first, second, "lamp-0003-red"]))
    assert hashes[0] == hashes[1] != hashes[2]
    return first, second


def test_colliding_ids_are_never_duplicates_of_each_other(tmp_path, collide):
    first, second = collide
    path = write_manifest(tmp_path / "m.parquet", _rows([first, "x", second, "x", None, "None", "y"]))
    with Manifest(str(path)) as manifest:
        found = find_duplicates(manifest)
    assert found.to_pylist() == [{"file": 0, "row": 1, "id": "x"}, {"file": 0, "row": 3, "id": "x"}]


def test_colliding_ids_are_matched_each_by_its_own_record(tmp_path, collide):
    first, second = collide
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows([first, "other", second]))
    _commit(store, "run-1", 1, path, {first})
    write_manifest(path, _rows(["other", second, first, "new"]))  # by id from here
    marked, found = _marks(store, str(path))
    assert marked == {("m.parquet", 2): "done"} == _oracle(store, str(path))
    assert found.by_id == 1


def test_compaction_keeps_colliding_ids_apart(tmp_path, collide, monkeypatch):
    first, second = collide
    monkeypatch.setattr(parts, "ROW_GROUP_ROWS", 2)
    store = LocalStore(tmp_path / "out")
    path = write_manifest(tmp_path / "m.parquet", _rows([first, second, "z"]))
    _commit(store, "run-1", 1, path, {first, "z"})
    _commit(store, "run-2", 2, path, {second, "z"})
    Checkpoint(store, "run-3").compact(keep=1)
    merged = pq.read_table(next(store.root.glob("_job/results/*.parquet")))
    assert sorted(zip(merged.column("id").to_pylist(), merged.column("epoch").to_pylist())) == [
        (first, 1), (second, 2), ("z", 2)]


def test_compaction_streams_and_keeps_each_ids_newest_record(tmp_path, monkeypatch):
    """Many runs, overlapping ids, a merge written in row groups of 7 through spills of a few
    rows: the result is what reading every record by id says, one record per id."""
    monkeypatch.setattr(parts, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(spill, "MEMORY_ROWS", 10)
    monkeypatch.setattr(spill, "PARTITION_ROWS", 16)
    store = LocalStore(tmp_path / "out")
    ids = [f"r{i:03d}" for i in range(120)]
    path = write_manifest(tmp_path / "m.parquet", _rows(ids))
    for epoch, (lo, hi, setup) in enumerate([(0, 80, "s-a"), (40, 120, "s-b"), (60, 70, "s-c")], start=1):
        _commit(store, f"2026010{epoch}T000000Z-run", epoch, path, set(ids[lo:hi]), setup=setup)
    before = Checkpoint(store, "reader").load()
    Checkpoint(store, "20260109T000000Z-end").compact(keep=1)
    (key,) = [o.key for o in store.list(layout.RESULTS)]
    part = pq.ParquetFile(store.root / key)
    assert part.metadata.num_row_groups == 18  # 120 records, 7 a row group
    table = part.read()
    assert sorted(table.column("id").to_pylist()) == ids  # each id once
    setups = dict(zip(table.column("id").to_pylist(), table.column("setup").to_pylist()))
    assert setups == {i: before._rows[i][1] for i in ids}
    assert setups["r065"] == "s-c" and setups["r050"] == "s-b" and setups["r010"] == "s-a"
    Checkpoint(store, "20260110T000000Z-fix").revoke(["r001", "r100"])
    after = Checkpoint(store, "reader").load()
    assert set(after) == set(ids) - {"r001", "r100"}


def test_a_damaged_part_costs_only_its_rows(tmp_path, monkeypatch):
    """A part that will not open, and one whose third row group breaks after two were read:
    their rows are not marked (the worker's marker check finds them), every other row is."""
    monkeypatch.setattr(parts, "ROW_GROUP_ROWS", 3)
    store = LocalStore(tmp_path / "out")
    ids = [f"r{i}" for i in range(30)]
    path = write_manifest(tmp_path / "m.parquet", _rows(ids))
    _commit(store, "2026-a", 1, path, set(ids[:10]))
    Checkpoint(store, "2026-b").compact(keep=0)  # one part of row groups of 3
    _commit(store, "2026-c", 1, path, set(ids[10:20]))
    _commit(store, "2026-d", 1, path, set(ids[20:25]))
    keys = sorted(o.key for o in store.list(layout.RESULTS))
    merged, cut = next(k for k in keys if "2026-b" in k), next(k for k in keys if "2026-d" in k)
    (store.root / cut).write_bytes((store.root / cut).read_bytes()[:100])
    data = bytearray((store.root / merged).read_bytes())
    column = parts.SCHEMA.get_field_index("row")  # one a resume reads
    page = pq.ParquetFile(store.root / merged).metadata.row_group(2).column(column).data_page_offset
    data[page + 4:page + 44] = b"\xff" * 40
    (store.root / merged).write_bytes(bytes(data))
    marked, found = _marks(store, str(path))
    assert marked == {("m.parquet", i): "done" for i in range(10, 20)}
    assert sorted(found.damaged) == sorted([merged, cut])


def test_a_file_written_to_during_a_run_records_no_positions(tmp_path):
    """Rows read from a manifest file rewritten after the run hashed it are recorded without a
    position (the next run matches them by id): their bytes are not the tagged ones."""
    from klein_ray.intake.marks import RowMarks
    from klein_ray.intake.prescan import Prescan
    from klein_ray.scheduling.resume import ResumePlan
    from klein_ray.scheduling.standing import Standing
    from klein_ray.types import RowSpec

    path = write_manifest(tmp_path / "m.parquet", _rows(["r0", "r1"]))
    with Manifest(str(path)) as manifest:
        mf, tag = manifest.files[0], manifest.tags()[0]
        plan = ResumePlan(manifest, Standing(RowMarks([2])), Prescan(), False, None,  # type: ignore[arg-type]
                          origins={mf.name: (0, mf.key, tag)})
        row = RowSpec("r1", "p", "tiny", (), 64, 64, None, 1.0, 1, "derived", "png", manifest_file=mf.name,
                      manifest_row=1, group=setup_group({}))
        assert plan.origin(row) == Origin("m.parquet", tag, 1, setup_group({}))
        write_manifest(path, _rows(["r0", "r1"], prompt="another prompt {}"))
        assert not manifest.unchanged(0) and plan.origin(row) is None

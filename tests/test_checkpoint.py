"""The compact checkpoint: every committed id comes back, parts stay few however long the run,
and merging never loses an id (LocalStore; the S3 path is covered end to end)."""

from __future__ import annotations

import pytest

from klein_ray.output import checkpoint, layout
from klein_ray.output.checkpoint import Checkpoint, DoneSet
from klein_ray.storage import LocalStore
from klein_ray.types import RowResult


def _result(i: int) -> RowResult:
    return RowResult(id=f"r{i:06d}", variant="tiny", image_key=f"images/r{i:06d}.png",
                     meta_key=f"meta/r{i:06d}.json", sha256="0" * 64, bytes=1, width=64, height=64,
                     seed=i, prompt="p", timings={"render": 0.1}, worker="w")


def _parts(store) -> list[str]:
    return [o.key for o in store.list(layout.RESULTS)]


def test_tiered_merging_bounds_parts_and_keeps_every_id(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FLUSH_ROWS", 10)  # a part per 10 rows: 400 parts unmerged
    store = LocalStore(tmp_path)
    cp = Checkpoint(store, "run-a")
    for i in range(4000):
        cp.record(_result(i))
    cp.flush()
    parts = _parts(store)
    assert len(parts) < 3 * checkpoint.MERGE_FANOUT, parts  # 400 parts merged down
    done = Checkpoint(store, "reader").load()
    assert len(done) == 4000
    assert all(f"r{i:06d}" in done for i in range(4000))


def test_compact_merges_runs_and_drops_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FLUSH_ROWS", 5)
    store = LocalStore(tmp_path)
    for run in ("run-a", "run-b"):  # two runs (say, killed) recorded overlapping rows
        cp = Checkpoint(store, run)
        for i in range(60):
            cp.record(_result(i))
        cp.flush()
    before = len(_parts(store))
    Checkpoint(store, "run-c").compact(keep=1)
    parts = _parts(store)
    assert before > 1 and len(parts) == 1
    done = Checkpoint(store, "reader").load()
    assert len(done) == 60


def test_compact_keeps_few_parts_alone(tmp_path):
    store = LocalStore(tmp_path)
    cp = Checkpoint(store, "run-a")
    cp.record(_result(1))
    cp.flush()
    cp.compact(keep=4)
    assert len(_parts(store)) == 1


@pytest.mark.parametrize("ids", [[], ["a"], ["a", "b", None, 3]])
def test_done_set_membership_is_exact(ids):
    done = DoneSet({"a": (None, None), "c": (None, None)})
    assert [i in done for i in ids] == [i in ("a", "c") for i in ids]
    assert "a" in done and "b" not in done and len(done) == 2

"""The planner: compatible rows only, batch-size bound, every row exactly once, and a hard bound
on the rows it holds however scattered the stream."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klein_ray.intake.planner import Planner, unit_key
from klein_ray.types import RowSpec, WorkUnit

BATCH = {"a": 4, "b": 2, "c": 1}


def spec(i: int, variant: str = "a", width: int | None = 1024, height: int | None = 1024,
         steps: int | None = None, guidance: float = 4.0, references: tuple[str, ...] = ()) -> RowSpec:
    return RowSpec(
        id=f"r{i}", prompt=f"prompt {i}", variant=variant, references=references, width=width,
        height=height, steps=steps, guidance=guidance, seed=i, seed_source="manifest", format="png",
        manifest_file="m.parquet", manifest_row=i,
    )


def check_units(units: list[WorkUnit], rows: list[RowSpec], batch_sizes: dict[str, int]) -> None:
    """Every row exactly once, units homogeneous and within the variant's batch size."""
    seen = Counter(r.id for u in units for r in u.rows)
    assert seen == Counter(r.id for r in rows), "rows lost or duplicated"
    assert sum(u.size for u in units) == len(rows)
    assert len({u.unit_id for u in units}) == len(units), "unit ids repeat"
    for u in units:
        assert 1 <= u.size <= batch_sizes[u.variant]
        for r in u.rows:
            assert unit_key(r) == (u.variant, u.width, u.height, u.steps, u.guidance, u.references, u.adapters)
    # Within a group, rows keep their manifest order.
    by_key: dict[tuple, list[int]] = {}
    for u in units:
        by_key.setdefault(unit_key(u.rows[0]), []).extend(r.manifest_row for r in u.rows)
    for order in by_key.values():
        assert order == sorted(order)


def test_full_groups_are_emitted_as_soon_as_full():
    p = Planner(BATCH)
    rows = [spec(i) for i in range(9)]
    emitted = [list(p.add(r)) for r in rows]
    sizes = [[u.size for u in e] for e in emitted]
    assert sizes == [[], [], [], [4], [], [], [], [4], []]
    (last,) = list(p.flush())
    assert last.size == 1 and last.rows[0].id == "r8"
    assert list(p.flush()) == []


@pytest.mark.parametrize("field, values", [
    ("variant", ["a", "b"]),
    ("width", [512, 1024]),
    ("height", [512, 768]),
    ("steps", [None, 4, 8]),
    ("guidance", [3.5, 4.0]),
    ("references", [(), ("s3://b/x.png",), ("s3://b/y.png",), ("s3://b/x.png", "s3://b/y.png"),
                    ("s3://b/y.png", "s3://b/x.png")]),
])
def test_incompatible_rows_are_never_grouped(field, values):
    rows = [spec(i, **{field: values[i % len(values)]}) for i in range(40)]
    units = list(Planner(BATCH).plan(rows))
    check_units(units, rows, BATCH)
    for u in units:
        assert len({getattr(r, field) for r in u.rows}) == 1
    # Compatible rows did get batched together.
    assert any(u.size > 1 for u in units)


def test_rows_with_the_same_key_share_units_regardless_of_other_fields():
    rows = [spec(i) for i in range(8)]  # different ids, prompts, seeds: one key
    units = list(Planner(BATCH).plan(rows))
    assert [u.size for u in units] == [4, 4]
    assert [r.id for r in units[0].rows] == ["r0", "r1", "r2", "r3"]


def test_reference_less_sizes_from_references_are_their_own_group():
    rows = [spec(0, width=None, height=None, references=("s3://b/r.png",)),
            spec(1, width=None, height=None, references=("s3://b/r.png",)),
            spec(2, width=1024, height=1024, references=("s3://b/r.png",))]
    units = list(Planner(BATCH).plan(rows))
    assert sorted(u.size for u in units) == [1, 2]
    check_units(units, rows, BATCH)


def test_batch_size_one_emits_every_row_alone():
    rows = [spec(i, variant="c") for i in range(5)]
    p = Planner(BATCH)
    for r in rows:
        (u,) = list(p.add(r))
        assert u.rows == (r,)
    assert list(p.flush()) == []


def test_unknown_variant_is_refused():
    with pytest.raises(KeyError):
        list(Planner(BATCH).plan([spec(0, variant="zzz")]))


def _random_rows(rng: random.Random, n: int) -> list[RowSpec]:
    return [
        spec(i, variant=rng.choice("abc"), width=rng.choice([512, 1024]), height=rng.choice([512, 1024]),
             steps=rng.choice([None, 4]), guidance=rng.choice([1.0, 4.0]),
             references=rng.choice([(), ("s3://b/1",), ("s3://b/1", "s3://b/2")]))
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_pending", [0, 1, 7, 64, 4096])
def test_random_streams_lose_and_duplicate_nothing(seed, max_pending):
    rng = random.Random(seed)
    rows = _random_rows(rng, 500)
    p = Planner(BATCH, max_pending_rows=max_pending)
    units = []
    for r in rows:
        units.extend(p.add(r))
        assert p.waiting <= max(max_pending, 0)
    units.extend(p.flush())
    assert p.waiting == 0 and p.open_groups == 0
    check_units(units, rows, BATCH)


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([64, 512, 1024]),
                            st.sampled_from([None, 4, 50]), st.sampled_from([(), ("s3://b/1",)])),
                  max_size=120),
    max_pending=st.integers(min_value=0, max_value=20),
    batch=st.fixed_dictionaries({"a": st.integers(1, 8), "b": st.integers(1, 8), "c": st.integers(1, 8)}),
)
def test_planner_property(keys, max_pending, batch):
    rows = [spec(i, variant=v, width=w, steps=s, references=refs) for i, (v, w, s, refs) in enumerate(keys)]
    p = Planner(batch, max_pending_rows=max_pending)
    units = []
    for r in rows:
        units.extend(p.add(r))
        assert p.waiting <= max_pending
    units.extend(p.flush())
    check_units(units, rows, batch)
    # Unit ids are handed out in emission order.
    assert [u.unit_id for u in units] == list(range(len(units)))


def test_memory_bound_with_scattered_keys():
    """1000 rows over 500 distinct keys, max 10 pending: bounded, and still every row once."""
    rng = random.Random(1234)
    rows = []
    for i in range(1000):
        k = rng.randrange(500)
        rows.append(spec(i, width=64 + 16 * (k % 100), height=64 + 16 * (k // 100)))
    assert len({unit_key(r) for r in rows}) > 400
    p = Planner({"a": 4}, max_pending_rows=10)
    units = []
    peak = 0
    for r in rows:
        units.extend(p.add(r))
        peak = max(peak, p.waiting)
        assert p.waiting <= 10
        assert p.open_groups <= 10
    assert peak == 10  # the bound is used, not merely respected
    units.extend(p.flush())
    check_units(units, rows, {"a": 4})
    assert len(units) > 1000 / 4  # scattered keys force part-full units


def test_memory_bound_evicts_oldest_group_first():
    p = Planner({"a": 100}, max_pending_rows=3)
    rows = [spec(0, width=64), spec(1, width=80), spec(2, width=96), spec(3, width=112)]
    out = []
    for r in rows[:3]:
        out.extend(p.add(r))
    assert out == []
    (evicted,) = list(p.add(rows[3]))
    assert evicted.rows == (rows[0],)


def test_plan_with_no_rows():
    assert list(Planner(BATCH).plan([])) == []


def test_look_ahead_returns_the_rows_it_read_and_each_variants_sizes_most_common_first():
    from klein_ray.intake.planner import look_ahead

    rows = ([spec(i, width=512, height=512) for i in range(5)] + [spec(10 + i, width=1024, height=768) for i in range(7)]
            + [spec(20, width=None, height=None, references=("s3://b/ref.png",))]  # sized by its reference
            + [spec(30 + i, variant="b", width=256, height=256, references=("s3://b/r.png",)) for i in range(2)]
            + [spec(40 + i) for i in range(50)])
    stream = iter(rows)
    ahead, sizes = look_ahead(stream, limit=15)
    assert ahead == rows[:15]
    assert sizes == {"a": ((1024, 768, 0), (512, 512, 0)), "b": ((256, 256, 1),)}
    # Nothing is lost: the planner sees the rows read ahead, then the rest of the stream.
    from itertools import chain

    units = list(Planner(BATCH).plan(chain(ahead, stream)))
    check_units(units, rows, BATCH)

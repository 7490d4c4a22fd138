"""Damage drawn by hypothesis, on local and S3 (moto) outputs: images deleted, cut short or
rotted in place, markers deleted, garbled, swapped or copied over another row's, the checkpoint
cut short, in any combination. Whatever was done, `verify --deep` names exactly the rows that
claim to be committed and are not, `render --verify-deep` restores every row, and a second
`verify --deep` is clean. 100 examples a store (the tiny model renders only the damaged rows)."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from localrun import job, manifest, render, rows

from klein_ray.commands.verify import verify_output
from klein_ray.output.layout import RESULTS, image_key, meta_key
from klein_ray.storage import LocalStore, open_store

pytestmark = pytest.mark.slow
N = 5
IDS = [f"r{i}" for i in range(N)]
EXAMPLES = 100

_row = st.sampled_from(IDS)
DAMAGE = st.lists(st.one_of(
    st.tuples(st.sampled_from(["delete-image", "cut-image", "rot-image", "delete-marker", "garble-marker"]), _row),
    st.tuples(st.sampled_from(["swap-markers", "copy-marker"]), _row, _row),
    st.tuples(st.just("cut-checkpoint")),
), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    """One rendered output (local files), copied into a fresh output for every example."""
    root = tmp_path_factory.mktemp("damage")
    cfg = job(tiny_models)
    uri = manifest(root / "m.parquet", rows(N))
    assert render(uri, str(root / "out"), cfg)[1] == 0
    return cfg, uri, root / "out"


def _copy_into(src: Path, store) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            key = path.relative_to(src).as_posix()
            info = LocalStore(src).head(key)
            store.put(key, path.read_bytes(), metadata=info.metadata if info else None)


def _apply(store, damage) -> set[str]:
    """Apply ``damage``; the rows that then claim to be committed and are not."""
    marker_of = {i: i for i in IDS}  # whose marker each row's key holds (None: gone, "": garbage)
    image_ok = dict.fromkeys(IDS, True)
    checkpoint = True
    for kind, *rows_ in damage:
        if kind == "cut-checkpoint":
            for obj in list(store.list(RESULTS)):
                store.put(obj.key, store.get(obj.key)[:30])
            checkpoint = False
        elif kind in ("delete-image", "cut-image", "rot-image"):
            (r,) = rows_
            key = image_key(r, "png")
            info = store.head(key)
            if info is None:
                continue
            data = store.get(key)
            if kind == "delete-image":
                store.delete(key)
            elif kind == "cut-image":
                store.put(key, data[: len(data) // 2], metadata=info.metadata)
            else:  # same size, other bytes, the metadata still claiming the old sha256
                store.put(key, data[1:] + data[:1], metadata=info.metadata)
            image_ok[r] = False
        elif kind in ("delete-marker", "garble-marker"):
            (r,) = rows_
            if marker_of[r] is None:
                continue
            if kind == "delete-marker":
                store.delete(meta_key(r))
                marker_of[r] = None
            else:
                store.put(meta_key(r), b'{"image": "garbled')
                marker_of[r] = ""
        else:
            a, b = rows_
            if a == b or marker_of[a] is None or (kind == "swap-markers" and marker_of[b] is None):
                continue
            body_a = store.get(meta_key(a))
            if kind == "swap-markers":
                store.put(meta_key(a), store.get(meta_key(b)))
                marker_of[a] = marker_of[b]
            store.put(meta_key(b), body_a)
            marker_of[b] = marker_of[a] if kind == "copy-marker" else body_owner(body_a)
    claimed = {r for r in IDS if marker_of[r] is not None or checkpoint}
    return {r for r in claimed if not (marker_of[r] == r and image_ok[r])}


def body_owner(body: bytes) -> str:
    try:
        return json.loads(body)["id"]
    except (ValueError, KeyError, TypeError):
        return ""


def _check(base, store_uri: str, store, damage) -> None:
    cfg, uri, src = base
    _copy_into(src, store)
    expected = _apply(store, damage)
    found = verify_output(store_uri, deep=True)
    assert {v.id for v in found.report.broken} == expected, damage
    summary, code = render(uri, store_uri, cfg, verify_first="deep")
    assert code == 0, (summary, damage)
    again = verify_output(store_uri, deep=True)
    assert not again.report.broken and again.report.checked == N, (again.report.broken, damage)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE)
def test_local_damage_is_found_exactly_and_repaired(base, damage):
    with tempfile.TemporaryDirectory(prefix="klein-ray-damage-") as out:
        _check(base, out, LocalStore(out), damage)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE)
def test_s3_damage_is_found_exactly_and_repaired(base, moto_s3, s3_env, damage):
    s3_env(moto_s3)
    uri = f"s3://{moto_s3.new_bucket()}/out-{uuid.uuid4().hex[:6]}"
    _check(base, uri, open_store(uri), damage)

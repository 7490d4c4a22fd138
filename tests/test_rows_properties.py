"""Properties of row validation and the id -> key mapping, over generated input (hypothesis):
every valid id maps to safe keys inside OUT, distinct ids never share a key, and validation
never raises, whatever the values: a RowSpec within SPEC's bounds, or row errors naming known
columns."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROWS_BASE, rows_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klein_ray.intake.rows import KNOWN_COLUMNS, MAX_SEED, RowValidator, valid_id
from klein_ray.output.layout import image_key, meta_key
from klein_ray.storage import LocalStore, check_key
from klein_ray.types import RowError, RowSpec


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("aZ09._-/\\ \n\x00:~%"), max_size=140),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True),
))
def test_any_valid_id_maps_to_safe_keys_inside_the_root(out_root, row_id):
    if not valid_id(row_id):
        return
    store = LocalStore(out_root)
    root = out_root.resolve()
    for fmt in ("png", "jpeg", "webp"):
        for key in (image_key(row_id, fmt), meta_key(row_id)):
            assert check_key(key) == key
            resolved = store._path(key).resolve()
            assert resolved.is_relative_to(root), (row_id, key, resolved)
            assert resolved != root
    # Image and meta keys never collide, and distinct ids give distinct keys.
    assert image_key(row_id, "png") != meta_key(row_id)


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True))
def test_distinct_ids_give_distinct_keys(a, b):
    if a != b:
        assert meta_key(a) != meta_key(b)
        assert image_key(a, "png") != image_key(b, "png")


_scalars = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["png", "jpeg", "webp", "tiny", "tiny-base", "row-1", "s3://b/a.png", "ftp://x/y",
                     "rel/path.png", "", " "]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=12))


_rows = st.dictionaries(st.sampled_from(KNOWN_COLUMNS + ("sku", "priority")),
                       st.one_of(_values, st.lists(_values, max_size=3)))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rows)
def test_validate_never_raises(raw):
    """A RowSpec or a non-empty list of RowErrors, whatever the values."""
    v = RowValidator(rows_config(), ROWS_BASE)
    _check_outcome(v.validate(raw, "f.parquet", 3), raw)


def _check_outcome(out, raw) -> None:
    if isinstance(out, RowSpec):
        assert valid_id(out.id)
        assert out.prompt.strip()
        assert out.variant in ("tiny", "tiny-base")
        assert out.format in ("png", "jpeg", "webp")
        assert 0 <= out.seed <= MAX_SEED
        for side in (out.width, out.height):
            assert side is None or (64 <= side <= 2048 and side % 16 == 0)
        if not out.references:
            assert out.width is not None and out.height is not None
        assert all(r.startswith(("s3://", "http://", "https://", "file://")) for r in out.references)
        assert out.manifest_row == 3
    else:
        assert isinstance(out, list) and out
        assert all(isinstance(e, RowError) and e.column and e.message for e in out)
        assert all(e.column in KNOWN_COLUMNS for e in out)

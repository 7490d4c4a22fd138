"""Row validation against SPEC's manifest table, defaults, derived seeds, and the id -> key
mapping that keeps every output inside OUT (the same over generated input:
test_rows_properties.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import ROWS_BASE as BASE
from helpers import rows_config as make_config
from hypothesis import given
from hypothesis import strategies as st

from klein_ray.config import JobConfig
from klein_ray.intake.rows import (
    KNOWN_COLUMNS,
    MAX_SEED,
    RowValidator,
    derive_seed,
    valid_id,
)
from klein_ray.output.layout import image_key
from klein_ray.types import RowError, RowSpec


@pytest.fixture
def validator() -> RowValidator:
    return RowValidator(make_config(), BASE)


def ok(validator: RowValidator, **raw) -> RowSpec:
    raw.setdefault("id", "row-1")
    raw.setdefault("prompt", "a red cube")
    out = validator.validate(raw, "m.parquet", 7)
    assert isinstance(out, RowSpec), out
    return out


def errors(validator: RowValidator, **raw) -> list[RowError]:
    raw.setdefault("id", "row-1")
    raw.setdefault("prompt", "a red cube")
    out = validator.validate(raw, "m.parquet", 7)
    assert isinstance(out, list) and out, f"expected errors, got {out!r}"
    for e in out:
        assert isinstance(e, RowError)
        assert e.stage == "validate"
        assert e.manifest_file == "m.parquet" and e.manifest_row == 7
        assert e.message
    return out


def columns(errs: list[RowError]) -> list[str]:
    return [e.column for e in errs]


# -- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("row_id", ["a", "A", "0", "row-1", "a.b_c-d", "x" * 128, "9..", "a" + "." * 127])
def test_valid_ids(validator, row_id):
    assert valid_id(row_id)
    assert ok(validator, id=row_id).id == row_id


@pytest.mark.parametrize("row_id", [
    None, "", " ", "x" * 129, "-a", ".a", "_a", "..", "../x", "a/b", "a\\b", "a b", "a\n", "\na",
    "é", "a:b", "a*", 5, 5.0, True, b"abc", ["a"],
], ids=repr)
def test_invalid_ids(validator, row_id):
    assert not valid_id(row_id)
    errs = errors(validator, id=row_id)
    assert columns(errs) == ["id"]


def test_invalid_id_error_names_the_row(validator):
    (err,) = errors(validator, id=None)
    assert err.id == "<row 7>"
    assert "empty" in err.message
    (err,) = errors(validator, id="x" * 129)
    assert "129" in err.message
    (err,) = errors(validator, id=12)
    assert "string" in err.message


def test_every_problem_of_a_row_is_reported(validator):
    errs = errors(validator, id="bad id", prompt="", width=65, height=4096, steps=0, guidance=-1,
                  seed=-1, format="gif", variant="nope")
    assert set(columns(errs)) == {"id", "prompt", "width", "height", "steps", "guidance", "seed",
                                  "format", "variant"}


# -- prompt and variant -------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n\t", 3, ["a"]], ids=repr)
def test_prompt_must_be_non_empty_text(validator, prompt):
    assert columns(errors(validator, prompt=prompt)) == ["prompt"]


def test_prompt_is_kept_verbatim(validator):
    assert ok(validator, prompt="  spaced \u00e9 prompt ").prompt == "  spaced \u00e9 prompt "


def test_variant_defaults_to_config_default(validator):
    assert ok(validator).variant == "tiny"
    assert ok(validator, variant=None).variant == "tiny"
    assert ok(validator, variant="").variant == "tiny"


def test_variant_from_row_and_its_defaults(validator):
    spec = ok(validator, variant="tiny-base")
    assert spec.variant == "tiny-base"
    assert spec.steps == 8 and spec.guidance == 6.5
    spec = ok(validator, variant="tiny")
    assert spec.steps is None  # the model's own default, resolved by the worker
    assert spec.guidance == 4.0


def test_unknown_variant(validator):
    (err,) = errors(validator, variant="klein-9b")
    assert err.column == "variant" and "klein-9b" in err.message and "tiny" in err.message


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [64, 80, 512, 1024, 2032, 2048])
def test_valid_sides(validator, side):
    spec = ok(validator, width=side, height=side)
    assert (spec.width, spec.height) == (side, side)


@pytest.mark.parametrize("side", [0, -16, 48, 63, 65, 100, 1000, 2049, 2064, 4096, 512.0, "512", True],
                         ids=repr)
@pytest.mark.parametrize("column", ["width", "height"])
def test_invalid_sides(validator, column, side):
    errs = errors(validator, **{column: side})
    assert columns(errs) == [column]
    assert "multiple of 16" in errs[0].message


def test_size_defaults_without_references(validator):
    spec = ok(validator)
    assert (spec.width, spec.height) == (1024, 1024)
    spec = ok(validator, width=512)
    assert (spec.width, spec.height) == (512, 1024)
    spec = ok(validator, height=768)
    assert (spec.width, spec.height) == (1024, 768)


def test_size_defaults_with_references(validator):
    spec = ok(validator, references=["s3://b/ref.png"])
    assert (spec.width, spec.height) == (None, None)  # from the first reference, later
    spec = ok(validator, references=["s3://b/ref.png"], width=512, height=256)
    assert (spec.width, spec.height) == (512, 256)
    spec = ok(validator, references=[])  # an empty list is text-to-image
    assert (spec.width, spec.height) == (1024, 1024)


# -- steps, guidance, seed, format --------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 50, 1000])
def test_valid_steps(validator, steps):
    assert ok(validator, steps=steps).steps == steps


@pytest.mark.parametrize("steps", [0, -1, 1001, 4.0, "4", True], ids=repr)
def test_invalid_steps(validator, steps):
    assert columns(errors(validator, steps=steps)) == ["steps"]


@pytest.mark.parametrize("guidance", [0, 0.0, 1, 3.5, 100, 100.0])
def test_valid_guidance(validator, guidance):
    spec = ok(validator, guidance=guidance)
    assert spec.guidance == float(guidance) and isinstance(spec.guidance, float)


@pytest.mark.parametrize("guidance", [-0.1, 100.5, math.nan, math.inf, -math.inf, "3", True],
                         ids=repr)
def test_invalid_guidance(validator, guidance):
    assert columns(errors(validator, guidance=guidance)) == ["guidance"]


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32, MAX_SEED])
def test_valid_seed(validator, seed):
    spec = ok(validator, seed=seed)
    assert spec.seed == seed and spec.seed_source == "manifest"


@pytest.mark.parametrize("seed", [-1, -(2**63), MAX_SEED + 1, 2**64, 1.0, "1", True], ids=repr)
def test_invalid_seed(validator, seed):
    assert columns(errors(validator, seed=seed)) == ["seed"]


def test_derived_seed_is_stable_and_in_range(validator):
    spec = ok(validator, id="sku-123")
    assert spec.seed_source == "derived"
    assert spec.seed == derive_seed("sku-123")
    # Pinned: a re-render anywhere (other machine, other Python) reproduces the image.
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"klein-ray/seed/sku-123").digest()[:8], "big") & MAX_SEED
    assert spec.seed == expected
    assert 0 <= spec.seed <= MAX_SEED
    assert ok(RowValidator(make_config(), Path("/elsewhere")), id="sku-123").seed == spec.seed
    assert derive_seed("sku-124") != spec.seed


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True))
def test_derived_seed_in_range_for_any_id(row_id):
    seed = derive_seed(row_id)
    assert 0 <= seed <= MAX_SEED
    assert seed == derive_seed(row_id)


@pytest.mark.parametrize("fmt, ext", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_valid_formats(validator, fmt, ext):
    spec = ok(validator, format=fmt)
    assert spec.format == fmt
    assert image_key(spec.id, spec.format) == f"images/{spec.id}.{ext}"


def test_format_defaults_to_config(validator):
    assert ok(validator).format == "png"
    cfg = JobConfig(output={"format": "webp"})
    assert ok(RowValidator(cfg, BASE)).format == "webp"


@pytest.mark.parametrize("fmt", ["gif", "PNG", "jpg", "bmp", 1], ids=repr)
def test_invalid_format(validator, fmt):
    assert columns(errors(validator, format=fmt)) == ["format"]


# -- references ---------------------------------------------------------------------------


def test_reference_schemes_kept(validator):
    refs = ["s3://b/a.png", "http://example.com/b.png", "https://example.com/c.png", "file:///d/e.png"]
    assert ok(validator, references=refs).references == tuple(refs)


def test_reference_plain_paths_resolve_against_base_dir(tmp_path):
    v = RowValidator(make_config(), tmp_path)
    spec = ok(v, references=["refs/a.png", "./b.png", "sub/../c.png", str(tmp_path / "abs.png")])
    root = tmp_path.absolute()  # lexically: symlinks are followed by the fetch's confinement check
    assert spec.references == (
        (root / "refs" / "a.png").as_uri(),
        (root / "b.png").as_uri(),
        (root / "c.png").as_uri(),
        (root / "abs.png").as_uri(),
    )
    assert all(r.startswith("file:///") for r in spec.references)


def test_reference_whitespace_stripped(validator):
    assert ok(validator, references=["  s3://b/a.png \n"]).references == ("s3://b/a.png",)


@pytest.mark.parametrize("ref", ["ftp://host/a.png", "gs://bucket/a.png", "data://x"])
def test_reference_unsupported_scheme(validator, ref):
    (err,) = errors(validator, references=[ref])
    assert err.column == "references"
    scheme = ref.split("://")[0]
    assert "scheme" in err.message and scheme in err.message


@pytest.mark.parametrize("refs", [["", "s3://b/a"], [None], [3], ["  "]], ids=repr)
def test_reference_entries_must_be_non_empty_strings(validator, refs):
    assert set(columns(errors(validator, references=refs))) == {"references"}


@pytest.mark.parametrize("refs", ["s3://b/a.png", 5, 1.5], ids=repr)
def test_references_must_be_a_list(validator, refs):
    (err,) = errors(validator, references=refs)
    assert err.column == "references" and "list" in err.message


def test_reference_count_limit_default_is_ten(validator):
    refs = [f"s3://b/{i}.png" for i in range(10)]
    assert len(ok(validator, references=refs).references) == 10
    (err,) = errors(validator, references=refs + ["s3://b/x.png"])
    assert err.column == "references" and "11" in err.message and "10" in err.message


def test_reference_count_limit_from_config():
    v = RowValidator(make_config(max_count=2), BASE)
    assert len(ok(v, references=["s3://b/1", "s3://b/2"]).references) == 2
    (err,) = errors(v, references=["s3://b/1", "s3://b/2", "s3://b/3"])
    assert err.column == "references" and "2" in err.message
    v0 = RowValidator(make_config(max_count=0), BASE)
    assert ok(v0).references == ()
    assert columns(errors(v0, references=["s3://b/1"])) == ["references"]


def test_reference_tuple_accepted(validator):
    # pyarrow gives lists, but any iterable of strings is a list of references.
    assert ok(validator, references=("s3://b/a",)).references == ("s3://b/a",)


# -- passthrough and bookkeeping ----------------------------------------------------------


def test_passthrough_columns_preserved(validator):
    extra = {"sku": "SKU-1", "priority": 3, "campaign": None, "tags": ["x", "y"], "score": 0.5}
    spec = ok(validator, seed=5, width=512, **extra)
    assert spec.passthrough == extra
    assert not set(spec.passthrough) & set(KNOWN_COLUMNS)
    assert spec.manifest_file == "m.parquet" and spec.manifest_row == 7


def test_validate_does_not_mutate_its_input(validator):
    raw = {"id": "a", "prompt": "p", "references": ["x.png"], "sku": "s"}
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in raw.items()}
    validator.validate(raw, "f", 0)
    assert raw == before


# -- once bugs, now pinned -----------------------------------------------------------------


@pytest.mark.parametrize("column", ["variant", "format"])
def test_unhashable_variant_or_format_is_a_row_error(validator, column):
    assert columns(errors(validator, **{column: ["tiny"]})) == [column]


def test_reference_with_unknown_home_is_a_row_error(validator):
    assert columns(errors(validator, references=["~no-such-user-klein/x.png"])) == ["references"]


def test_spec_side_bounds_sit_inside_what_the_model_accepts():
    """A row that validates must never be refused (or silently floored) by the model layer."""
    from klein_ray.intake import rows
    from klein_ray.model import limits

    assert rows.MIN_SIDE >= limits.MIN_SIDE and rows.SIDE_MULTIPLE % limits.SIDE_MULTIPLE == 0
    for side in range(rows.MIN_SIDE, rows.MAX_SIDE + 1, rows.SIDE_MULTIPLE):
        assert limits.side_problem(side) is None

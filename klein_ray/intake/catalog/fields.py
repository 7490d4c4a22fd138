"""A catalog's keys as manifest values: each rendered text parsed into its column's type and
checked against the manifest's row rules (``intake.rows``), so that `expand` refuses what
`render` would (an id outside the id pattern, a side off the 16-pixel grid, a reference that is
not a URI the manifest accepts), naming the key and the reason.

A converter takes the rendered value (text, or a catalog's plain value) and returns the column's
value, ``None`` (the column left null), ``DROP`` (one reference or adapter left out) or raises
``TemplateProblem`` with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from klein_ray.intake.catalog.templates import TemplateProblem
from klein_ray.intake.rows import (
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    _id_reason,
    normalise_reference,
    valid_id,
)
from klein_ray.types import IMAGE_EXTENSIONS

DROP = object()  # a list element (reference, adapter) that rendered empty: left out
Converter = Callable[[Any], Any]
_INT = re.compile(r"[+-]?\d+")
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off", "")
PASSTHROUGH_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TemplateProblem(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    raise TemplateProblem(f"{what} must be an integer, got {value!r}")


def as_float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise TemplateProblem(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TemplateProblem(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TemplateProblem(f"{what} must be a finite number, got {value!r}")
    return number


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def row_id(value: Any) -> str:
    text = str(value).strip() if value is not None else ""
    if not valid_id(text):
        raise TemplateProblem(_id_reason(text or None))
    return text


def prompt(value: Any) -> str:
    if _empty(value):
        raise TemplateProblem("the prompt is empty")
    return str(value).strip()


def side(name: str) -> Converter:
    def convert(value: Any) -> int | None:
        if _empty(value):
            return None
        number = as_int(value, name)
        if number % SIDE_MULTIPLE or not MIN_SIDE <= number <= MAX_SIDE:
            raise TemplateProblem(f"{name} must be a multiple of 16 in [{MIN_SIDE}, {MAX_SIDE}], got {number}")
        return number
    return convert


def size_preset(sizes: dict[str, tuple[int, int]]) -> Converter:
    def convert(value: Any) -> tuple[int, int] | None:
        if _empty(value):
            return None
        name = str(value).strip()
        if name not in sizes:
            raise TemplateProblem(f"size {name!r} is not one of the catalog's sizes ({', '.join(sizes)})")
        return sizes[name]
    return convert


def steps(value: Any) -> int | None:
    if _empty(value):
        return None
    number = as_int(value, "steps")
    if not 1 <= number <= 1000:
        raise TemplateProblem(f"steps must be an integer in [1, 1000], got {number}")
    return number


def guidance(value: Any) -> float | None:
    if _empty(value):
        return None
    number = as_float(value, "guidance")
    if not 0 <= number <= 100:
        raise TemplateProblem(f"guidance must be a number in [0, 100], got {number}")
    return number


def seed(value: Any) -> int:
    if _empty(value):
        raise TemplateProblem("the seed is empty")
    number = as_int(value, "seed")
    if not 0 <= number <= MAX_SEED:
        raise TemplateProblem(f"seed must be an integer in [0, 2^63-1], got {number}")
    return number


def image_format(value: Any) -> str | None:
    if _empty(value):
        return None
    fmt = str(value).strip()
    if fmt not in IMAGE_EXTENSIONS:
        raise TemplateProblem(f"unknown format {fmt!r}; use png, jpeg or webp")
    return fmt


def variant(known: set[str] | None) -> Converter:
    def convert(value: Any) -> str | None:
        if _empty(value):
            return None
        name = str(value).strip()
        if known is not None and name not in known:
            raise TemplateProblem(f"unknown variant {name!r}; the job config has {sorted(known)}")
        return name
    return convert


def reference(base_dir: Path) -> Converter:
    """A reference as the absolute URI the manifest keeps (paths from the catalog's directory);
    an empty one is dropped."""
    def convert(value: Any) -> Any:
        if _empty(value):
            return DROP
        try:
            return normalise_reference(str(value).strip(), base_dir)
        except ValueError as exc:
            raise TemplateProblem(str(exc)) from None
    return convert


def adapter(value: Any) -> Any:
    return DROP if _empty(value) else str(value).strip()


def passthrough(kind: str) -> Converter:
    """A passthrough column's value as its type (``string`` keeps text as rendered)."""
    def convert(value: Any) -> Any:
        if value is None or isinstance(value, list):
            return value
        if kind == "string":
            return value if isinstance(value, str) else str(value)
        if _empty(value):
            return None
        if kind == "int":
            return as_int(value, "the value")
        if kind == "float":
            return as_float(value, "the value")
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in TRUE + FALSE:
            raise TemplateProblem(f"expected true or false, got {value!r}")
        return text in TRUE
    return convert


def plain_type(value: Any) -> str:
    """The passthrough type of a plain (not templated) value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "list" if isinstance(value, list) else "string"

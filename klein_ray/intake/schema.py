"""The manifest's columns, defined once: the schema klein-ray writes manifests with (the demo's
sample, and what tools building manifests should write) and the types it accepts when reading.

| column | written as | accepted | required |
|---|---|---|---|
| ``id``, ``prompt`` | string | string | yes |
| ``variant``, ``format`` | string | string | no |
| ``references`` | list<string> | list<string>, or all null | no |
| ``width``, ``height``, ``steps`` | int32 | any integer | no |
| ``guidance`` | float64 | any integer or float | no |
| ``seed`` | int64 | any integer | no |
| ``adapters`` | list<string> | list<string>, or all null | no |
| ``adapter_scales`` | list<float64> | list of integers or floats, or all null | no |

Any other column is passed through into each row's metadata. Dictionary-encoded columns are
read as their values; a column of nulls only (type null) is accepted for every column.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

REQUIRED = ("id", "prompt")

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("variant", pa.string()),
    ("references", pa.list_(pa.string())), ("width", pa.int32()), ("height", pa.int32()),
    ("steps", pa.int32()), ("guidance", pa.float64()), ("seed", pa.int64()), ("format", pa.string()),
    ("adapters", pa.list_(pa.string())), ("adapter_scales", pa.list_(pa.float64())),
])
KNOWN_COLUMNS = tuple(MANIFEST_SCHEMA.names)

_STRING = (pa.types.is_string, pa.types.is_large_string)
_INTEGER = (pa.types.is_integer,)
_NUMBER = (pa.types.is_integer, pa.types.is_floating)
# Scalar columns: what the reader accepts (a name for messages, and the type checks).
COLUMN_TYPES: dict[str, tuple[str, tuple[Callable[[pa.DataType], bool], ...]]] = {
    "id": ("string", _STRING),
    "prompt": ("string", _STRING),
    "variant": ("string", _STRING),
    "width": ("integer", _INTEGER),
    "height": ("integer", _INTEGER),
    "steps": ("integer", _INTEGER),
    "guidance": ("float", _NUMBER),
    "seed": ("int64", _INTEGER),
    "format": ("string", _STRING),
}


def manifest_schema(passthrough: Iterable[tuple[str, pa.DataType]] = ()) -> pa.Schema:
    """``MANIFEST_SCHEMA`` followed by passthrough columns (name, type)."""
    schema = MANIFEST_SCHEMA
    for name, dtype in passthrough:
        if name in KNOWN_COLUMNS:
            raise ValueError(f"{name!r} is a manifest column, not a passthrough one")
        schema = schema.append(pa.field(name, dtype))
    return schema


# The columns whose values say what a row's image is (the id names it; passthrough columns
# only travel into the metadata): a row whose values here change is another render.
RENDER_COLUMNS = ("prompt", "variant", "references", "width", "height", "steps", "guidance", "seed",
                  "format", "adapters", "adapter_scales")


def row_digest(raw: dict[str, Any]) -> str:
    """What a manifest row asks to render, as the manifest states it (16 hex digits): the values
    of ``RENDER_COLUMNS``, absent and null alike. A committed row whose digest differs from its
    row's now is stale: the row was edited since. Defaults the job config fills in are not here:
    they are the variant's setup (``output.record.setup_digest``)."""
    values = [_plain(raw.get(c)) for c in RENDER_COLUMNS]
    return hashlib.sha256(json.dumps(values, separators=(",", ":")).encode()).hexdigest()[:16]


# The columns a row's setup depends on besides its variant's config (``output.record.row_setup``).
SETUP_COLUMNS = ("variant", "adapters", "adapter_scales")


def setup_group(raw: dict[str, Any]) -> str:
    """The values of ``SETUP_COLUMNS`` as the manifest states them (null and absent alike), as
    compact JSON: rows of one group share their setup under any config, so a checkpoint
    records the group with each row and a reader computes the setup once per group, not per row."""
    return json.dumps([_plain(raw.get(c)) for c in SETUP_COLUMNS], separators=(",", ":"))


def _plain(value: Any) -> Any:
    """A value as JSON states it the same however Parquet typed it (int32 or int64 widths, a
    float guidance of 4 or 4.0, a list or a tuple of references)."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def type_problem(name: str, dtype: pa.DataType) -> str | None:
    """Why a column of type ``dtype`` cannot be the manifest column ``name`` (None: it can, or
    it is a passthrough column)."""
    if name == "references":
        is_list = pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
        if pa.types.is_null(dtype) or (is_list and _type_ok(dtype.value_type, _STRING)):
            return None
        hint = ""
        if _type_ok(dtype, _STRING):  # one URI per row, written as a plain string
            hint = ("; write each row's references as a list, even of one: with pyarrow "
                    "pa.array([[uri] for uri in uris], pa.list_(pa.string())), with pandas "
                    "df['references'] = df['references'].map(lambda uri: [uri])")
        return f"column 'references' has type {dtype}, expected list<string>{hint}"
    if name in ("adapters", "adapter_scales"):
        wanted = "list<string>" if name == "adapters" else "list<float>"
        checks = _STRING if name == "adapters" else _NUMBER
        is_list = pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
        if pa.types.is_null(dtype) or (is_list and _type_ok(dtype.value_type, checks)):
            return None
        return f"column {name!r} has type {dtype}, expected {wanted}"
    if name in COLUMN_TYPES and not _type_ok(dtype, COLUMN_TYPES[name][1]):
        return f"column {name!r} has type {dtype}, expected {COLUMN_TYPES[name][0]}"
    return None


def _type_ok(dtype: pa.DataType, checks) -> bool:
    if pa.types.is_dictionary(dtype):  # dictionary-encoded (categorical) columns read as their values
        dtype = dtype.value_type
    return pa.types.is_null(dtype) or any(check(dtype) for check in checks)

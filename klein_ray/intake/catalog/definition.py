"""The catalog file: what `klein-ray expand` reads to write a manifest (docs/catalog.md).

A catalog names a products table (CSV, Parquet or JSONL; its columns are the template variable
``product``), a list of scenes (``scene``) and the seeds (``seed``: 0..n-1), and says for each
manifest column a plain value or a Jinja2 template. Every (product, scene, seed) is one manifest
row. This module owns the file's model (pydantic, unknown keys are errors) and its loading; the
templates are compiled by ``intake.templates`` and the rows made by ``intake.expand``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from klein_ray.config import ConfigError, read_yaml_mapping
from klein_ray.intake.rows import MAX_SEED, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from klein_ray.intake.schema import KNOWN_COLUMNS

MAX_SEEDS = 10_000  # seeds per (product, scene): past this a catalog is a mistake, not a review
# Passthrough column names: plain identifiers, so they read the same in Parquet, SQL and YAML.
COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Columns the catalog writes itself besides the manifest's (the LoRA feature reads ``adapters``).
RESERVED_COLUMNS = (*KNOWN_COLUMNS, "adapters", "adapter_scales")
PRODUCT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                   ".ndjson": "jsonl"}

Scalar = str | int | float | bool


class CatalogError(ConfigError):
    """The catalog cannot be expanded (exit code 2); the message names the key and the row."""


def _one_empty_scene() -> list[dict[str, Any]]:
    return [{}]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnSpec(_Strict):
    """A passthrough column written with an explicit type (a template renders to text)."""

    value: Scalar | list[str] = Field(description="A plain value, or a template rendered per row.")
    type: Literal["string", "int", "float", "bool"] = Field(
        "string", description="The column's type; a rendered value is parsed as this type.")


class Catalog(_Strict):
    """One catalog file. Every key besides ``products``, ``scenes``, ``seeds``, ``vars``,
    ``sizes`` and ``when`` is a manifest column: a plain value or a template."""

    products: str = Field(description="The products table: a path (relative to the catalog "
                          "file) or an s3:// URI of a .csv, .parquet or .jsonl file.")
    products_format: Literal["csv", "parquet", "jsonl"] | None = Field(
        None, description="The products table's format; unset: from its extension.")
    scenes: list[dict[str, Any]] = Field(
        default_factory=_one_empty_scene, min_length=1,
        description="The scenes, each a mapping (template variable `scene`); every product is "
        "rendered in every scene. Unset: one empty scene.")
    seeds: int | list[int] = Field(
        1, description="How many seeds per product and scene (template variable `seed`: 0..n-1), "
        "or a list of seeds: the rows' seeds are then those values (variable `seed_value`).")
    vars: dict[str, Any] = Field(default_factory=dict,
                                 description="Constants for the templates (variable `vars`).")
    sizes: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="Named sizes, name -> [width, height]; `size` picks one.")
    size: str | None = Field(None, description="A template naming one of `sizes` per row (empty: "
                             "no size, the first reference's or 1024²). Excludes width/height.")
    when: str | None = Field(None, description="A Jinja2 expression (no braces): a row is written "
                             "only where it is true, e.g. \"scene.name != 'beach' or "
                             "product.category == 'swim'\".")
    id: str = Field(description="The row id template; unique, and within the manifest's id rules.")
    prompt: str = Field(description="The prompt template.")
    references: list[str] | None = Field(
        None, description="Reference image templates, one per reference; one rendering to an "
        "empty string drops that reference (a product without a second photo).")
    variant: str | None = Field(None, description="The variant (job config name) or a template.")
    adapters: list[str] | None = Field(
        None, description="Adapter (LoRA) names or templates, written as the list<string> column "
        "`adapters`; empty renderings are dropped.")
    width: int | str | None = Field(None, description="Width in pixels, or a template.")
    height: int | str | None = Field(None, description="Height in pixels, or a template.")
    steps: int | str | None = Field(None, description="Denoising steps, or a template.")
    guidance: float | str | None = Field(
        None, description="Guidance scale, or a template; only Base variants use it.")
    seed: int | str | None = Field(
        None, description="The row's seed as a template; unset: the seeds list's value, else "
        "derived from the row id (stable across runs and machines).")
    format: str | None = Field(None, description="Image format (png, jpeg, webp) or a template.")
    columns: dict[str, ColumnSpec | Scalar | list[str]] = Field(
        default_factory=dict, description="Passthrough columns, name -> plain value, template "
        "(text) or {value, type}; they travel into each row's metadata (e.g. sku, to group the "
        "report by).")

    @field_validator("references", "adapters", mode="before")
    @classmethod
    def _one_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: int | list[int]) -> int | list[int]:
        count = seeds if isinstance(seeds, int) else len(seeds)
        if not 1 <= count <= MAX_SEEDS:
            raise ValueError(f"seeds: between 1 and {MAX_SEEDS:,} seeds, got {count:,}")
        if isinstance(seeds, list):
            if any(not 0 <= s <= MAX_SEED for s in seeds):
                raise ValueError("seeds: every seed must be an integer in [0, 2^63-1]")
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds: the list repeats a seed")
        return seeds

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for name, (width, height) in sizes.items():
            for side in (width, height):
                if side % SIDE_MULTIPLE or not MIN_SIDE <= side <= MAX_SIDE:
                    raise ValueError(f"sizes.{name}: {width}x{height}: sides must be multiples of 16 "
                                     f"in [{MIN_SIDE}, {MAX_SIDE}]")
        return sizes

    @field_validator("columns")
    @classmethod
    def _column_names(cls, columns: dict[str, Any]) -> dict[str, Any]:
        for name in columns:
            if name in RESERVED_COLUMNS:
                raise ValueError(f"columns.{name}: {name!r} is a manifest column; set it at the top level")
            if not COLUMN_NAME.fullmatch(name):
                raise ValueError(f"columns.{name}: a column name is letters, digits and '_' "
                                 "(not starting with a digit), at most 64")
        return columns

    @field_validator("scenes")
    @classmethod
    def _scene_keys(cls, scenes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, scene in enumerate(scenes):
            if any(not isinstance(k, str) for k in scene):
                raise ValueError(f"scenes[{i}]: keys must be strings")
        return scenes

    @model_validator(mode="after")
    def _one_way_to_size(self) -> Catalog:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise ValueError("give either `size` (a preset of `sizes`) or width/height, not both")
        if self.size is not None and not self.sizes:
            raise ValueError("`size` picks one of `sizes`, and there are none")
        return self

    def seed_values(self) -> list[int]:
        """The `seed_value` of each seed index: the list given, or 0..n-1 for a count."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def products_format_of(self) -> str:
        if self.products_format:
            return self.products_format
        suffix = Path(self.products.split("?", 1)[0]).suffix.lower()
        if suffix not in PRODUCT_FORMATS:
            raise CatalogError(f"products: cannot tell the format of {self.products!r} from its "
                               f"extension ({', '.join(PRODUCT_FORMATS)}); set products_format")
        return PRODUCT_FORMATS[suffix]


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML file; CatalogError names the key and the problem."""
    p = Path(path)
    raw = read_yaml_mapping(p, "catalog", CatalogError)
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors())
        raise CatalogError(f"catalog {p}: {problems}") from None

"""The catalog expander: products x scenes x seeds into manifest rows, streamed.

``Expander`` compiles the catalog's templates (``intake.templates``), checks what can be
checked before reading a row (unknown variables, product columns and scene keys no row has),
then walks the products table once: each template is rendered in the loop its variables need
(once per product, per scene, or per row), parsed into its column's type and checked against
the manifest's row rules (``intake.fields``). Rows come out in a fixed order (product, scene,
seed), one at a time. Any problem is a ``CatalogError`` naming the catalog key, the product row
(file, row number and first column's value), the scene and seed where they matter, and the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from klein_ray.config import JobConfig, ReferenceConfig
from klein_ray.intake.catalog import fields
from klein_ray.intake.catalog.definition import Catalog, CatalogError, ColumnSpec
from klein_ray.intake.catalog.products import ProductRow, ProductTable
from klein_ray.intake.catalog.templates import (
    CATALOG,
    PRODUCT,
    ROW,
    SCENE,
    Columns,
    Compiler,
    Template,
    TemplateProblem,
    attributes_read,
)
from klein_ray.intake.rows import derive_seed
from klein_ray.intake.schema import KNOWN_COLUMNS, manifest_schema

# The manifest columns a catalog may set (besides `columns`), with their converters' names.
SINGLE_KEYS = ("id", "prompt", "variant", "width", "height", "size", "steps", "guidance", "seed", "format")
LIST_KEYS = ("references", "adapters")


@dataclass(frozen=True)
class Where:
    """Which row is being made: the product, scene and seed (indices), for messages."""

    product: ProductRow | None = None
    scene: int = -1
    scene_label: str = ""
    seed: int = -1

    def describe(self, level: int) -> str:
        if self.product is None or level == CATALOG:
            return "the catalog"
        parts = [self.product.where]
        if level >= SCENE:
            parts.append(f"scene {self.scene}{self.scene_label}")
        if level >= ROW:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)


@dataclass
class Counts:
    """What an expansion found besides its rows: warnings for the command to print."""

    products: int = 0
    rows: int = 0
    guidance_by_variant: dict[str | None, int] = field(default_factory=dict)
    reference_problems: int = 0
    first_reference_problem: str = ""


@dataclass(frozen=True)
class _Key:
    template: Template
    convert: Callable[[Any], Any]
    column: str  # the key's column (references/adapters: the list's)


class Expander:
    """One catalog, ready to expand (see the module docstring). ``config``: the job config the
    manifest is meant for (its variants and reference limits are then checked too);
    ``reference_check``: says why a reference would be refused by the render (None: fine), for
    warnings."""

    def __init__(self, catalog: Catalog, catalog_path: Path, config: JobConfig | None = None,
                 reference_check: Callable[[str], str | None] | None = None):
        self.catalog, self.name = catalog, catalog_path.name
        self.base_dir = catalog_path.absolute().parent
        self.config = config
        self.max_references = (config.references if config else ReferenceConfig()).max_count
        self.reference_check = reference_check
        self.counts = Counts()
        self._scenes = [self._scene(i, s) for i, s in enumerate(catalog.scenes)]
        self._seed_values = catalog.seed_values()
        self._compiler = Compiler()
        self._keys = self._compile()
        self._levels = {level: [k for k in self._keys if k.template.level == level]
                        for level in (CATALOG, PRODUCT, SCENE, ROW)}
        # How a row is assembled from the rendered values: scalar columns as they are, each list
        # from its elements' keys ("references[0]"...), size into width and height.
        self._scalars = [k.column for k in self._keys if k.column not in (*LIST_KEYS, "size", "when")]
        self._lists = [(column, [k.template.key for k in self._keys if k.column == column])
                       for column in LIST_KEYS if getattr(catalog, column) is not None]
        self._listed_seeds = isinstance(catalog.seeds, list)
        self._vars = Columns(catalog.vars, "vars")
        self._checked_refs: set[str] = set()

    # -- the catalog, before any row --------------------------------------------------------

    def _compile(self) -> list[_Key]:
        compiler, cat = self._compiler, self.catalog
        known = set(self.config.variants) if self.config else None
        converters: dict[str, Callable[[Any], Any]] = {
            "id": fields.row_id, "prompt": fields.prompt, "variant": fields.variant(known),
            "width": fields.side("width"), "height": fields.side("height"),
            "size": fields.size_preset(cat.sizes), "steps": fields.steps, "guidance": fields.guidance,
            "seed": fields.seed, "format": fields.image_format,
        }
        keys: list[_Key] = []
        try:
            if cat.when is not None:  # first: a row it leaves out is not rendered further
                keys.append(_Key(compiler.expression("when", cat.when), bool, "when"))
            for key in SINGLE_KEYS:
                value = getattr(cat, key)
                if value is not None:
                    keys.append(_Key(compiler.template(key, value), converters[key], key))
            for key, convert in (("references", fields.reference(self.base_dir)), ("adapters", fields.adapter)):
                for i, value in enumerate(getattr(cat, key) or ()):
                    keys.append(_Key(compiler.template(f"{key}[{i}]", value), convert, key))
            for name, spec in cat.columns.items():
                value, kind = _column(spec)
                keys.append(_Key(compiler.template(f"columns.{name}", value), fields.passthrough(kind), name))
        except TemplateProblem as exc:
            raise CatalogError(f"{self.name}: {exc}") from None
        return keys

    def scene_label(self, index: int) -> str:
        """What messages add after "scene N": its name, when it has one."""
        return self._scenes[index].label.removeprefix(f"scene {index}")

    def _scene(self, index: int, scene: dict[str, Any]) -> Columns:
        name = scene.get("name")
        label = f" ({name!r})" if isinstance(name, str) else ""
        return Columns(scene, f"scene {index}{label}")

    def passthrough(self) -> list[tuple[str, pa.DataType]]:
        """The passthrough columns, in the catalog's order (``adapters`` first when given)."""
        found: list[tuple[str, pa.DataType]] = []
        if self.catalog.adapters is not None and "adapters" not in KNOWN_COLUMNS:
            found.append(("adapters", pa.list_(pa.string())))
        for name, spec in self.catalog.columns.items():
            value, kind = _column(spec)
            found.append((name, pa.list_(pa.string()) if isinstance(value, list) else fields.PASSTHROUGH_TYPES[kind]))
        return found

    def schema(self) -> pa.Schema:
        return manifest_schema(self.passthrough())

    def check_names(self, table: ProductTable) -> None:
        """Product columns and scene keys a template reads that no row or scene has: refused
        before the first row (a JSONL table's columns are checked row by row instead)."""
        scene_keys = set().union(*(set(s) for s in self._scenes))
        for key in self._keys:
            if table.columns is not None:
                missing = sorted(attributes_read(key.template, "product") - set(table.columns))
                if missing:
                    raise CatalogError(f"{self.name}: {key.template.key!r} reads product.{missing[0]}, but "
                                       f"{table.name} has no column {missing[0]!r} (its columns: "
                                       f"{', '.join(table.columns)})")
            unknown = sorted(attributes_read(key.template, "scene") - scene_keys)
            if unknown:
                raise CatalogError(f"{self.name}: {key.template.key!r} reads scene.{unknown[0]}, which no "
                                   f"scene has (their keys: {', '.join(sorted(scene_keys)) or 'none'})")

    # -- the rows ---------------------------------------------------------------------------

    def rows(self, table: ProductTable) -> Iterator[tuple[tuple[int, int, int], dict[str, Any]]]:
        """((product index, scene index, seed index), row) for every row, in order."""
        self.check_names(table)
        base = self._compiler.context({"vars": self._vars})
        top = self._render_level(CATALOG, base, (None, -1, -1))
        if top is None:
            return
        for product in table.rows():
            self.counts.products += 1
            ctx1 = dict(base, product=Columns(product.values, "product", "column"),
                        product_index=product.index)
            values1 = self._render_level(PRODUCT, ctx1, (product, -1, -1), top)
            if values1 is None:
                continue
            for s, scene in enumerate(self._scenes):
                ctx = dict(ctx1, scene=scene, scene_index=s)
                values2 = self._render_level(SCENE, ctx, (product, s, -1), values1)
                if values2 is None:
                    continue
                for k, seed_value in enumerate(self._seed_values):
                    # One mapping per scene, its seed set per row: templates cannot write to it.
                    ctx["seed"], ctx["seed_value"] = k, seed_value
                    values3 = self._render_level(ROW, ctx, (product, s, k), values2)
                    if values3 is not None:
                        self.counts.rows += 1
                        yield (product.index, s, k), self._row(values3, seed_value, (product, s, k))

    def _where(self, at: tuple[ProductRow | None, int, int]) -> Where:
        product, scene, seed = at
        return Where(product, scene, self.scene_label(scene) if scene >= 0 else "", seed)

    def _render_level(self, level: int, context: dict[str, Any], at: tuple[ProductRow | None, int, int],
                      above: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The values of the keys rendered in this loop, added to those of the loops around it;
        None when `when` is false here (no row below). ``at``: (product, scene, seed) for
        messages."""
        keys = self._levels[level]
        if not keys:
            return above or {}
        values = dict(above or {})
        for key in keys:
            try:
                value = key.convert(key.template.render(context))
            except TemplateProblem as exc:
                where = "" if level == CATALOG else f" for {self._where(at).describe(level)}"
                raise CatalogError(f"{self.name}: {key.template.key!r}{where}: {exc}") from None
            if key.column == "when":
                if not value:
                    return None
                continue
            if key.column in LIST_KEYS:
                values[key.template.key] = value
                if key.column == "references" and value is not fields.DROP:
                    self._check_reference(value)
            else:
                values[key.column] = value
        return values

    def _row(self, values: dict[str, Any], seed_value: int, at: tuple[ProductRow | None, int, int]) -> dict[str, Any]:
        row = {k: values[k] for k in self._scalars}
        if "size" in values:
            row["width"], row["height"] = values["size"] or (None, None)
        for column, elements in self._lists:
            row[column] = [v for v in (values[e] for e in elements) if v is not fields.DROP]
        refs = row.get("references")
        if refs is not None and len(refs) > self.max_references:
            raise CatalogError(f"{self.name}: 'references' for {self._where(at).describe(ROW)}: {len(refs)} "
                               f"references, at most {self.max_references} allowed")
        if refs == []:
            row["references"] = None  # every reference dropped: a plain text-to-image row
        if "seed" not in row:
            row["seed"] = seed_value if self._listed_seeds else derive_seed(row["id"])
        if row.get("guidance") is not None:
            variant = row.get("variant")
            self.counts.guidance_by_variant[variant] = self.counts.guidance_by_variant.get(variant, 0) + 1
        return row

    def _check_reference(self, uri: str) -> None:
        if self.reference_check is None or uri in self._checked_refs:
            return
        if len(self._checked_refs) < 100_000:  # each distinct reference once, within a bound
            self._checked_refs.add(uri)
        problem = self.reference_check(uri)
        if problem:
            self.counts.reference_problems += 1
            self.counts.first_reference_problem = self.counts.first_reference_problem or problem

    def guidance_warnings(self) -> list[str]:
        """Rows that set guidance for a variant that ignores it (distilled and KV variants;
        only Base variants run classifier-free guidance). Known only with the job config."""
        if self.config is None:
            return []
        found = []
        for variant, count in sorted(self.counts.guidance_by_variant.items(), key=lambda kv: str(kv[0])):
            name = variant or self.config.default_variant
            vcfg = self.config.variants.get(name)
            if vcfg is not None and vcfg.pipeline in ("distilled", "kv"):
                found.append(f"guidance is set on {count:,} row(s) of variant {name!r}, which is "
                             f"{vcfg.pipeline}: FLUX.2 klein's distilled variants ignore guidance; only "
                             "Base variants use it")
        return found


def _column(spec: ColumnSpec | Any) -> tuple[Any, str]:
    """A passthrough column's value and type: as given, else text for a template (any string)
    and the plain value's own type otherwise."""
    if isinstance(spec, ColumnSpec):
        return spec.value, spec.type
    return spec, "string" if isinstance(spec, str) else fields.plain_type(spec)

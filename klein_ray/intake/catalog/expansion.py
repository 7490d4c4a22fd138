"""One run of `klein-ray expand`: a catalog's rows written as a manifest, or nothing at all.

The rows stream from the ``Expander`` into the ``ManifestWriter`` (deterministic Parquet in a
private temporary file). Once it is complete, its ids are checked for duplicates exactly as
render's prescan checks a manifest (``prescan.find_duplicates``: full strings, spilled to local
disk, so memory does not grow with the catalog), and the two rows that made the first duplicate
are found by expanding again up to the second one (the expansion is deterministic; only an error
pays for it). Only then is the file published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from klein_ray.config import JobConfig, StorageConfig
from klein_ray.intake.catalog.definition import CatalogError, load_catalog
from klein_ray.intake.catalog.expand import Expander, Where
from klein_ray.intake.catalog.products import ProductTable
from klein_ray.intake.catalog.templates import ROW
from klein_ray.intake.catalog.writer import ManifestWriter
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.prescan import find_duplicates


@dataclass
class ExpandResult:
    """What `expand` wrote, and what it warns about."""

    manifest: str
    rows: int
    products: int
    scenes: int
    seeds: int
    columns: list[str]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"manifest": self.manifest, "rows": self.rows, "products": self.products,
                "scenes": self.scenes, "seeds": self.seeds, "columns": self.columns,
                "warnings": len(self.warnings)}


def expand_catalog(catalog_path: str | Path, dest: str, storage: StorageConfig | None = None,
                   config: JobConfig | None = None,
                   reference_check: Callable[[str], str | None] | None = None) -> ExpandResult:
    """Expand the catalog at ``catalog_path`` into the manifest ``dest`` (a path or s3:// URI).
    CatalogError (exit 2) for any problem, and then nothing is written."""
    path = Path(catalog_path)
    catalog = load_catalog(path)
    expander = Expander(catalog, path, config, reference_check)
    storage = storage or (config.storage if config else StorageConfig())
    with ProductTable(catalog.products, catalog.products_format_of(), expander.base_dir, storage) as table, \
            ManifestWriter(expander.schema(), dest, storage) as writer:
        for _, row in expander.rows(table):
            writer.add(row)
        written = writer.close()
        if writer.rows == 0:
            raise CatalogError(f"{path.name}: the catalog expands to no rows (an empty products table, "
                               "or `when` false for every row); nothing written")
        pair = _first_duplicate(written)
        if pair is not None:
            _name_duplicate(expander, table, pair)
        uri = writer.publish()
    warnings = expander.guidance_warnings()
    if expander.counts.reference_problems:
        warnings.append(f"{expander.counts.reference_problems:,} distinct reference(s) would be refused by "
                        f"`render` as configured, e.g.: {expander.counts.first_reference_problem}")
    return ExpandResult(uri, writer.rows, expander.counts.products, len(catalog.scenes),
                        len(catalog.seed_values()), expander.schema().names, warnings)


def _first_duplicate(written: Path) -> tuple[int, int, str] | None:
    """The first row whose id an earlier row made, that earlier row, and the id; or None."""
    with Manifest(str(written)) as manifest:
        duplicates = find_duplicates(manifest)  # in row order
    first: dict[str, int] = {}
    for row, row_id in zip(duplicates.column("row").to_pylist(), duplicates.column("id").to_pylist()):
        if row_id in first:
            return first[row_id], row, row_id
        first[row_id] = row
    return None


def _name_duplicate(expander: Expander, table: ProductTable, found: tuple[int, int, str]) -> None:
    """Raise CatalogError naming the two rows that made the same id."""
    *pair, row_id = found
    origins = []
    for position, (origin, _) in enumerate(expander.rows(table)):  # again, as far as the second
        if position in pair:
            origins.append(origin)
        if position == pair[1]:
            break
    wanted = {o[0] for o in origins}
    products = {p.index: p for p in table.rows() if p.index in wanted}
    shown = []
    for product, scene, seed in origins:
        shown.append(Where(products.get(product), scene, expander.scene_label(scene), seed).describe(ROW))
    raise CatalogError(f"{expander.name}: 'id' for {shown[1]}: duplicate id {row_id!r}, made before by "
                       f"{shown[0]}; every row's id must be unique (make the id template name what "
                       "differs: the product, scene and seed); nothing written")

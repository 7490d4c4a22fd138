"""One run of `klein-ray expand`: a catalog's rows written as a manifest, or nothing at all.

The rows stream from the ``Expander`` into the ``ManifestWriter`` (deterministic Parquet in a
private temporary file). Ids are checked for duplicates the way the prescan does: an 8-byte hash
per row, sorted once at the end, so a million rows cost ~8 MB (~24 at the sort), not a set of
strings. A duplicate is confirmed against the ids written, and the two rows that made it are
found by expanding again up to the second one (the expansion is deterministic; only an error
pays for it). Only then is the file published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from klein_ray.config import JobConfig, StorageConfig
from klein_ray.intake.catalog.definition import CatalogError, load_catalog
from klein_ray.intake.catalog.expand import Expander, Where
from klein_ray.intake.catalog.products import ProductTable
from klein_ray.intake.catalog.templates import ROW
from klein_ray.intake.catalog.writer import ManifestWriter
from klein_ray.intake.prescan import id_hash

CHUNK_ROWS = 65_536  # ids hashed per numpy chunk


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


class _Ids:
    """Every row's id hash, in numpy chunks (see the module docstring)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self._hashes: list[int] = []

    def add(self, row_id: str) -> None:
        self._hashes.append(id_hash(row_id))
        if len(self._hashes) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._hashes:
            self.chunks.append(np.array(self._hashes, dtype=np.uint64))
            self._hashes = []

    def duplicate(self) -> tuple[int, int] | None:
        """The positions of the first pair of rows sharing a hash (by the later row), or None."""
        self._flush()
        if not self.chunks:
            return None
        hashes = np.concatenate(self.chunks)
        self.chunks = [hashes]
        ranked = np.sort(hashes)
        repeated = np.unique(ranked[1:][ranked[1:] == ranked[:-1]])
        if not len(repeated):
            return None
        first: dict[int, int] = {}
        for position in np.nonzero(np.isin(hashes, repeated))[0]:  # only the repeated ones, in order
            value = int(hashes[position])
            if value in first:
                return first[value], int(position)
            first[value] = int(position)
        return None


def expand_catalog(catalog_path: str | Path, dest: str, storage: StorageConfig | None = None,
                   config: JobConfig | None = None,
                   reference_check: Callable[[str], str | None] | None = None) -> ExpandResult:
    """Expand the catalog at ``catalog_path`` into the manifest ``dest`` (a path or s3:// URI).
    CatalogError (exit 2) for any problem, and then nothing is written."""
    path = Path(catalog_path)
    catalog = load_catalog(path)
    expander = Expander(catalog, path, config, reference_check)
    storage = storage or (config.storage if config else StorageConfig())
    ids = _Ids()
    with ProductTable(catalog.products, catalog.products_format_of(), expander.base_dir, storage) as table, \
            ManifestWriter(expander.schema(), dest, storage) as writer:
        for _, row in expander.rows(table):
            ids.add(row["id"])
            writer.add(row)
        written = writer.close()
        if writer.rows == 0:
            raise CatalogError(f"{path.name}: the catalog expands to no rows (an empty products table, "
                               "or `when` false for every row); nothing written")
        pair = ids.duplicate()
        if pair is not None:
            _confirm_duplicate(expander, table, written, pair)
        uri = writer.publish()
    warnings = expander.guidance_warnings()
    if expander.counts.reference_problems:
        warnings.append(f"{expander.counts.reference_problems:,} distinct reference(s) would be refused by "
                        f"`render` as configured, e.g.: {expander.counts.first_reference_problem}")
    return ExpandResult(uri, writer.rows, expander.counts.products, len(catalog.scenes),
                        len(catalog.seed_values()), expander.schema().names, warnings)


def _confirm_duplicate(expander: Expander, table: ProductTable, written: Path, pair: tuple[int, int]) -> None:
    """Raise CatalogError naming the two rows that made the same id (unless their 8-byte hashes
    merely collide, which is left alone: the ids differ)."""
    column = pq.ParquetFile(written).read(columns=["id"]).column("id")
    first, second = (column[p].as_py() for p in pair)
    if first != second:
        return
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
    raise CatalogError(f"{expander.name}: 'id' for {shown[1]}: duplicate id {first!r}, made before by "
                       f"{shown[0]}; every row's id must be unique (make the id template name what "
                       "differs: the product, scene and seed); nothing written")

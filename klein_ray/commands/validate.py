"""`klein-ray validate`: every problem of a manifest at once, without rendering anything."""

from __future__ import annotations

from pathlib import Path

from klein_ray.config import JobConfig
from klein_ray.intake.manifest import Manifest, id_hash, prescan
from klein_ray.intake.rows import RowValidator, duplicate_id_error
from klein_ray.model.limits import shape_problem
from klein_ray.render.references import ReferenceError, ReferenceFetcher
from klein_ray.types import RowError


def validate_manifest(uri: str, config: JobConfig, check_references: bool = False) -> list[RowError]:
    """All row problems (several per row when a row has several); raises ManifestError for
    problems with the manifest as a whole. With ``check_references`` every distinct reference
    of a valid row is fetched and decoded (same caps and address rules as rendering)."""
    fetcher = ReferenceFetcher(config.references, config.storage) if check_references else None
    checked_refs: dict[str, str | None] = {}  # uri -> problem (None: fine)
    problems: list[RowError] = []
    with Manifest(uri, config.storage) as manifest:
        duplicates, _ = prescan(manifest, config.default_variant)
        validator = RowValidator(config, base_dir=Path.cwd())
        for mf, index, raw in manifest.iter_rows():
            row_id = raw.get("id")
            if isinstance(row_id, str) and id_hash(row_id) in duplicates:
                problems.append(duplicate_id_error(row_id, mf.name, index))
            checked = validator.validate(raw, mf.name, index)
            if isinstance(checked, list):
                problems.extend(checked)
                continue
            for uri in checked.references if fetcher else ():
                if uri not in checked_refs:
                    try:
                        ref = fetcher.fetch(uri)
                        checked_refs[uri] = shape_problem(ref.width, ref.height)
                    except ReferenceError as exc:
                        checked_refs[uri] = str(exc)
                if checked_refs[uri]:
                    problems.append(RowError.for_row(checked, "fetch", "ReferenceError",
                                                     checked_refs[uri], column="references"))
    return problems

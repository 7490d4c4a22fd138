"""`klein-ray validate`: every problem of a manifest at once, without rendering anything."""

from __future__ import annotations

from klein_ray.assets.confinement import confine, refusal
from klein_ray.assets.references import ReferenceError, ReferenceFetcher
from klein_ray.config import JobConfig
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.prescan import find_duplicates
from klein_ray.intake.rows import RowValidator, duplicate_id_error
from klein_ray.model.limits import shape_problem
from klein_ray.types import RowError, RowSpec


def validate_manifest(uri: str, config: JobConfig, check_references: bool = False,
                      output: str | None = None) -> list[RowError]:
    """All row problems (several per row when a row has several); raises ManifestError for
    problems with the manifest as a whole. Every reference is checked against the job's
    confinement (``references.local_roots`` / ``s3_buckets``, defaults resolved as `render`
    does; without ``output`` its bucket is not among the defaults). With ``check_references``
    every allowed, distinct reference of a valid row is also fetched and decoded (same caps
    and address rules as rendering)."""
    refcfg = confine(config.references, uri, output)
    fetcher = ReferenceFetcher(refcfg, config.storage) if check_references else None
    checked_refs: dict[str, str | None] = {}  # uri -> problem (None: fine)
    problems: list[RowError] = []
    with Manifest(uri, config.storage) as manifest:
        found = find_duplicates(manifest)
        files = [f.name for f in manifest.files]
        duplicates = {(files[f], r) for f, r in zip(found.column("file").to_pylist(), found.column("row").to_pylist())}
        validator = RowValidator(config, base_dir=manifest.base_dir)
        for mf, index, raw in manifest.iter_rows():
            row_id = raw.get("id")
            if (mf.name, index) in duplicates:
                problems.append(duplicate_id_error(str(row_id), mf.name, index))
            checked = validator.validate(raw, mf.name, index)
            if isinstance(checked, list):
                problems.extend(checked)
                continue
            problems.extend(_reference_problems(checked, refcfg, fetcher, checked_refs))
    return problems


def _reference_problems(row: RowSpec, refcfg, fetcher: ReferenceFetcher | None,
                        checked_refs: dict[str, str | None]) -> list[RowError]:
    """The row's references that may not be read or (when fetching) cannot be used; each
    distinct reference is checked once."""
    found = []
    for ref in row.references:
        if ref not in checked_refs:
            # Confinement first: it reads nothing, so it is checked with or without fetching.
            checked_refs[ref] = refusal(ref, refcfg) or (_fetch_problem(fetcher, ref) if fetcher else None)
        problem = checked_refs[ref]
        if problem:
            found.append(RowError.for_row(row, "fetch", "ReferenceError", problem, column="references"))
    return found


def _fetch_problem(fetcher: ReferenceFetcher, ref: str) -> str | None:
    try:
        fetched = fetcher.fetch(ref)
    except ReferenceError as exc:
        return str(exc)
    return shape_problem(fetched.width, fetched.height)

"""`klein-ray expand CATALOG --output MANIFEST`: a catalog's products x scenes x seeds as a manifest.

The expansion itself is ``intake.expansion``; this command adds what only the job config can
tell: the variants a row may name and whether they use guidance (with ``--config``), and whether
`render` would read each reference from where it is (``assets.confinement``, with the defaults
`render` applies for a manifest at MANIFEST's place): a reference outside is a warning here, a
failed row there.
"""

from __future__ import annotations

from klein_ray.assets.confinement import confine, refusal
from klein_ray.config import JobConfig
from klein_ray.intake.catalog.expansion import ExpandResult, expand_catalog


def expand(catalog: str, output: str, config: JobConfig | None = None) -> ExpandResult:
    """Write the manifest; CatalogError (exit 2) with nothing written when the catalog is wrong."""
    job = config or JobConfig()
    refcfg = confine(job.references, output)
    return expand_catalog(catalog, output, job.storage, config, lambda uri: refusal(uri, refcfg))

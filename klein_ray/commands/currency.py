"""How current an output's committed rows are, against its job's manifest as it is now.

A committed row is *stale* when its manifest row's values changed since it was rendered (the
marker's ``inputs`` differ from the row's digest now: `render` renders it again), *outdated*
when it was rendered under another setup of its variant (another model, weights, precision or
encoding under the same variant name: kept, reported, rendered again with
``render --rerender-outdated``). Judged from the checkpoint's records and ``_job/state.json``
(the manifest, the default variant, each variant's setup when the job last ran), read-only.
A variant's LoRA adapter files are looked at as they are now (the job's config names them):
a row rendered with an adapter file that has changed since is outdated. Shared by `status` and
`verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from klein_ray.assets import adapters as adapter_files
from klein_ray.config import ConfigError, JobConfig, StorageConfig
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.intake.schema import RENDER_COLUMNS, row_digest
from klein_ray.output.checkpoint import OUTDATED, STALE, DoneSet
from klein_ray.output.record import resolve_adapters, row_setup, setup_digest
from klein_ray.storage import StorageError


@dataclass
class Currency:
    ids: set[str] | None  # the manifest's ids (None: the manifest cannot be read from here)
    stale: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)


def currency(state: dict, done: DoneSet, storage: StorageConfig, config: JobConfig | None = None) -> Currency:
    """The manifest's ids, and which committed rows are stale or outdated (one pass over the
    manifest's id and render columns); ``config``: the job's, to look at its adapters now."""
    uri = state.get("manifest")
    if not uri:
        return Currency(None)
    default = state.get("default_variant") or ""
    setups, ids, scales = _setups(state, config)
    found = Currency(set())
    try:
        with Manifest(uri, storage) as manifest:
            for batch in manifest.iter_batches(["id", "variant", *RENDER_COLUMNS]):
                for raw in batch.to_pylist():
                    row_id = raw.get("id")
                    if not isinstance(row_id, str):
                        continue
                    found.ids.add(row_id)  # type: ignore[union-attr]
                    variant = raw.get("variant") or default
                    used = resolve_adapters(raw.get("adapters"), raw.get("adapter_scales"), scales.get(variant, {}))
                    setup = row_setup(setups.get(variant, ""), used, ids.get(variant, {}))
                    standing = done.standing(row_id, partial(row_digest, raw), setup)
                    if standing == STALE:
                        found.stale.append(row_id)
                    elif standing == OUTDATED:
                        found.outdated.append(row_id)
    except (ManifestError, StorageError, OSError, ValueError):
        return Currency(None)
    return found


def _setups(state: dict, config: JobConfig | None) -> tuple[dict, dict, dict]:
    """Each variant's setup digest, adapter identities and default scales: the state's, with
    the adapters' identities (and so the setups) taken afresh from the config when it has
    adapters that can be read now."""
    setups, adapters = dict(state.get("setups") or {}), state.get("adapters") or {}
    ids, scales = adapters.get("identities") or {}, adapters.get("scales") or {}
    sources = state.get("sources") or {}
    if config is None or not any(v.adapters for v in config.variants.values()):
        return setups, ids, scales
    try:
        ids = adapter_files.identities(config)
    except ConfigError:  # an adapter gone: judge against what the last run saw
        return setups, adapters.get("identities") or {}, scales
    for variant, source in sources.items():
        if variant in config.variants:
            setups[variant] = setup_digest(config, variant, source, ids.get(variant))
    return setups, ids, scales

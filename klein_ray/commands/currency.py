"""How current an output's committed rows are, against its job's manifest as it is now.

A committed row is *stale* when its manifest row's values changed since it was rendered (the
marker's ``inputs`` differ from the row's digest now: `render` renders it again), *outdated*
when it was rendered under another setup of its variant (another model, weights, precision or
encoding under the same variant name: kept, reported, rendered again with
``render --rerender-outdated``). Judged from the checkpoint's records and ``_job/state.json``
(the manifest, the default variant, each variant's setup when the job last ran), read-only.
Shared by `status` and `verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from klein_ray.config import StorageConfig
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.intake.schema import RENDER_COLUMNS, row_digest
from klein_ray.output.checkpoint import OUTDATED, STALE, DoneSet
from klein_ray.storage import StorageError


@dataclass
class Currency:
    ids: set[str] | None  # the manifest's ids (None: the manifest cannot be read from here)
    stale: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)


def currency(state: dict, done: DoneSet, storage: StorageConfig) -> Currency:
    """The manifest's ids, and which committed rows are stale or outdated (one pass over the
    manifest's id and render columns)."""
    uri = state.get("manifest")
    if not uri:
        return Currency(None)
    setups, default = state.get("setups") or {}, state.get("default_variant") or ""
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
                    standing = done.standing(row_id, partial(row_digest, raw), setups.get(variant, ""))
                    if standing == STALE:
                        found.stale.append(row_id)
                    elif standing == OUTDATED:
                        found.outdated.append(row_id)
    except (ManifestError, StorageError, OSError, ValueError):
        return Currency(None)
    return found

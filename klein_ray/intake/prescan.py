"""The prescan: one pass over the whole manifest before anything renders.

It decodes every column of every file (a damaged page or a bad UTF-8 string stops the job here,
exit 2, not halfway through), finds the ids that occur more than once (every row with one is
rejected: which was meant is unknowable) and counts what the run will do, per variant, asking
the caller's ``standing`` (the ledger's checkpoint, through the driver) where each row stands:
not committed, committed and current, committed from other values (stale: rendered again), or
under another setup of its variant (outdated: rendered again only when asked). The same
``standing`` decides again as the rows stream to the workers, so the counts the run starts with
are the ones it then follows.

Ids are kept as 8-byte hashes in numpy arrays, so this stays ~8 bytes a row.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klein_ray.intake.manifest import Manifest
from klein_ray.intake.schema import RENDER_COLUMNS

# (raw row, its variant) -> None (not committed), "done", "stale" or "outdated"
Standing = Callable[[dict[str, Any], str], "str | None"]
SKIPPED = ("done", "outdated")  # what a run skips (outdated: unless it renders them again)


@dataclass
class Prescan:
    duplicates: set[int]  # id hashes that occur more than once
    pending: Counter[str] = field(default_factory=Counter)  # rows to render, per variant
    done: int = 0  # committed and current: skipped
    stale: int = 0  # committed from values the manifest no longer has: rendered again
    outdated: int = 0  # committed under another setup of the variant: skipped unless asked

    @property
    def to_render(self) -> int:
        return sum(self.pending.values())


def id_hash(value: object) -> int:
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "big")


def prescan(manifest: Manifest, default_variant: str, standing: Standing | None = None,
            rerender_outdated: bool = False) -> Prescan:
    """Duplicate ids and the run's counts (see the module docstring)."""
    chunks: list[np.ndarray] = []
    scan = Prescan(set())
    columns = ["id", "variant", *RENDER_COLUMNS] if standing is not None else ["id", "variant"]
    for batch in manifest.iter_batches(columns, batch_size=16384, decode_all=True):
        ids = batch.column("id").to_pylist()
        # Only string ids can collide: a null id must not make the id "None" a duplicate.
        strings = [v for v in ids if isinstance(v, str)]
        chunks.append(np.fromiter((id_hash(v) for v in strings), dtype=np.uint64, count=len(strings)))
        if standing is None:
            variants = batch.column("variant").to_pylist() if "variant" in batch.schema.names else [None] * len(ids)
            scan.pending.update(v or default_variant for v in variants)
            continue
        for raw in batch.to_pylist():
            variant = raw.get("variant") or default_variant
            state = standing(raw, variant)
            if state == "done" or (state == "outdated" and not rerender_outdated):
                scan.done += state == "done"
                scan.outdated += state == "outdated"
                continue
            scan.stale += state == "stale"
            scan.outdated += state == "outdated"
            scan.pending[variant] += 1
    if chunks:
        hashes = np.sort(np.concatenate(chunks))
        dup = hashes[1:][hashes[1:] == hashes[:-1]]
        scan.duplicates = {int(h) for h in np.unique(dup)}
    return scan

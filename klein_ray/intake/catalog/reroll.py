"""Rows to render again (`klein-ray reroll`): rejected rows of a manifest, with new ids and seeds.

``find_rows`` streams the manifests once, keeping the rows whose ids were rejected (a review is
small) and every id's 8-byte hash (``ManifestIds``: what a new id must not collide with);
``write_rerolled`` writes the rows back with every column kept but ``id`` and ``seed``: the new
id (the caller names it: ``output.review.next_attempt_id``) and a seed derived from it, so the
second pass is deterministic and differs from the first. The columns are the manifests' own
(their schemas unified), ``seed`` widened to int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.config import StorageConfig
from klein_ray.intake.catalog.writer import ManifestWriter
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.intake.prescan import id_hash
from klein_ray.intake.rows import derive_seed


@dataclass(frozen=True)
class FoundRow:
    row: dict[str, Any]
    manifest: str  # the manifest URI it was found in
    schema: pa.Schema  # its file's columns


class ManifestIds:
    """The ids of the manifests read, as sorted 8-byte hashes (membership may err towards
    'present' on a hash collision, which only skips one attempt number)."""

    def __init__(self, chunks: list[np.ndarray]):
        self.hashes = np.sort(np.concatenate(chunks)) if chunks else np.array([], dtype=np.uint64)

    def __contains__(self, row_id: object) -> bool:
        h = np.uint64(id_hash(row_id))
        at = int(np.searchsorted(self.hashes, h))
        return at < len(self.hashes) and self.hashes[at] == h


def find_rows(manifests: list[str], wanted: set[str],
              storage: StorageConfig | None = None) -> tuple[dict[str, FoundRow], ManifestIds]:
    """The first row of each wanted id, in the manifests' order, and every id they hold."""
    found: dict[str, FoundRow] = {}
    chunks: list[np.ndarray] = []
    for uri in manifests:
        with Manifest(uri, storage) as manifest:
            schemas = {mf.name: pq.ParquetFile(mf.path).schema_arrow for mf in manifest.files}
            for mf, _, rows in manifest.iter_row_batches():
                ids = [row.get("id") for row in rows]
                strings = [v for v in ids if isinstance(v, str)]
                chunks.append(np.fromiter((id_hash(v) for v in strings), dtype=np.uint64, count=len(strings)))
                for row in rows:
                    if row.get("id") in wanted and row["id"] not in found:
                        found[row["id"]] = FoundRow(row, uri, schemas[mf.name])
    return found, ManifestIds(chunks)


def rerolled_schema(found: list[FoundRow]) -> pa.Schema:
    """The columns of the files the rows came from, unified; ``seed`` as int64."""
    try:
        schema = pa.unify_schemas([f.schema.remove_metadata() for f in found], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"the rejected rows' manifest files have columns that disagree: {exc}") from None
    seed = pa.field("seed", pa.int64())
    at = schema.get_field_index("seed")
    return schema.set(at, seed) if at >= 0 else schema.append(seed)


def write_rerolled(rows: list[tuple[FoundRow, str]], dest: str,
                   storage: StorageConfig | None = None) -> str:
    """Write each (row, new id) with the new id and its derived seed; the URI written."""
    schema = rerolled_schema([found for found, _ in rows])
    with ManifestWriter(schema, dest, storage) as writer:
        for found, new_id in rows:
            writer.add(dict(found.row, id=new_id, seed=derive_seed(new_id)))
        writer.close()
        return writer.publish()

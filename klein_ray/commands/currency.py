"""How current an output's committed rows are, against its job's manifest as it is now.

A committed row is *stale* when its manifest row's values changed since it was rendered (the
marker's ``inputs`` differ from the row's digest now: `render` renders it again), *outdated*
when it was rendered under another setup of its variant (another model, weights, precision or
encoding under the same variant name: kept, reported, rendered again with
``render --rerender-outdated``). Judged from the checkpoint's records and ``_job/state.json``
(the manifest, the default variant, each variant's setup when the job last ran), read-only.
A variant's LoRA adapter files are looked at as they are now (the job's config names them):
a row rendered with an adapter file that has changed since is outdated. Shared by `status` and
`verify`. ``currency`` holds the manifest's ids (small outputs); ``judged`` holds a byte per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa

from klein_ray.assets import adapters as adapter_files
from klein_ray.config import ConfigError, JobConfig, StorageConfig
from klein_ray.intake.manifest import Manifest, ManifestError
from klein_ray.intake.marks import RowMarks
from klein_ray.intake.schema import RENDER_COLUMNS, row_digest
from klein_ray.output.checkpoint import OUTDATED, STALE, DoneSet
from klein_ray.output.ledger import Ledger
from klein_ray.output.record import resolve_adapters, row_setup, setup_digest
from klein_ray.scheduling.standing import SetupOf, Standing, build, setup_lookup
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


@dataclass
class Judged:
    """The job's manifest as it is now (open until ``close``), and where each of its rows stands
    (by position, a byte per row)."""

    manifest: Manifest
    standing: Standing

    @property
    def marks(self) -> RowMarks:
        return self.standing.marks

    def ids(self, bits: int) -> Iterator[str]:
        """The ids of the rows whose marks have any of ``bits``, in manifest order."""
        return marked_ids(self.manifest, self.marks, bits)

    def close(self) -> None:
        self.manifest.close()


def state_setups(state: dict, config: JobConfig | None) -> SetupOf:
    """A setup group's setup as the job's state (and config's adapters now) define it."""
    setups, ids, scales = _setups(state, config)
    return setup_lookup(setups, ids, scales, state.get("default_variant") or "")


def judge_rows(state: dict, ledger: Ledger, storage: StorageConfig, config: JobConfig | None = None,
               tmp_dir: str | None = None) -> Judged | None:
    """The manifest (open: ``close`` it) and each row's standing against the checkpoint
    (``scheduling.standing``); None when the manifest cannot be read from here. The output's
    own storage errors are raised: only the manifest may be missing."""
    uri = state.get("manifest")
    if not uri:
        return None
    try:
        manifest = Manifest(uri, storage)
    except (ManifestError, StorageError, OSError, ValueError):
        return None
    try:
        manifest.tags()
        return Judged(manifest, build(ledger.checkpoint, manifest, state_setups(state, config), tmp_dir))
    except (ManifestError, OSError):
        manifest.close()
        return None
    except BaseException:
        manifest.close()
        raise


@contextmanager
def judged(state: dict, ledger: Ledger, storage: StorageConfig, config: JobConfig | None = None,
           tmp_dir: str | None = None) -> Iterator[Judged | None]:
    """``judge_rows`` for the duration of a block."""
    found = judge_rows(state, ledger, storage, config, tmp_dir)
    try:
        yield found
    finally:
        if found is not None:
            found.close()


def marked_ids(manifest: Manifest, marks: RowMarks, bits: int) -> Iterator[str]:
    """The ids of the rows whose marks have any of ``bits``, in manifest order (only the row
    groups holding one are read)."""
    def wanted(index: int, start: int, n: int) -> bool:
        return bool(np.any(marks.slice(index, start, n) & bits))

    for index, _, start, batch in manifest.iter_record_batches(["id"], 65536, wanted):
        chosen = np.flatnonzero(marks.slice(index, start, batch.num_rows) & bits)
        if len(chosen) and batch.num_columns:
            yield from (i for i in batch.column(0).take(pa.array(chosen)).to_pylist() if isinstance(i, str))


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

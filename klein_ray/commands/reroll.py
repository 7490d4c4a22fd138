"""`klein-ray reroll OUT REJECTS --output MANIFEST`: the rejected shots of a review, to render again.

The rejects file is the one the report page downloads (``output.review``), or a text file of
ids. The rows are looked up in the job's manifest (the one ``OUT/_job/state.json`` names: the
last run's) and any ``--manifest`` given (an earlier pass's), and written with new ids that say
which attempt they are (``mug-marble-0`` -> ``mug-marble-0.r2``, then ``.r3``) and new seeds
derived from those ids; every other column is kept. A new id is never one the manifests hold
or one the ledger says is committed in OUT, so rendering MANIFEST into OUT puts the second pass
beside the first and overwrites nothing. Unknown or invalid ids are errors (exit 2), and then
nothing is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from klein_ray.config import ConfigError, StorageConfig
from klein_ray.intake.catalog.reroll import find_rows, write_rerolled
from klein_ray.intake.rows import valid_id
from klein_ray.output.joblog import read_state
from klein_ray.output.ledger import Ledger
from klein_ray.output.markers import CommittedRow
from klein_ray.output.review import Rejects, RejectsError, next_attempt_id, read_rejects
from klein_ray.storage import open_store
from klein_ray.uris import local_path

log = logging.getLogger(__name__)
SHOWN = 5  # ids a message lists before "and N more"


@dataclass
class RerollResult:
    manifest: str  # where the rows to render again were written
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (rejected id, new id), manifest order
    sources: list[str] = field(default_factory=list)  # the manifests the rows were looked up in

    def summary(self) -> dict:
        return {"manifest": self.manifest, "rows": len(self.renamed), "sources": self.sources}


def reroll(out: str, rejects_path: str, dest: str, storage: StorageConfig | None = None,
           manifests: list[str] | None = None) -> RerollResult:
    storage = storage or StorageConfig()
    store = open_store(out, storage)
    state = read_state(store)
    if not state or not state.get("manifest"):
        raise ConfigError(f"no klein-ray output at {out} (no _job/state.json naming its manifest)")
    rejects = _rejects(rejects_path)
    if rejects.output and rejects.output.rstrip("/") != store.uri.rstrip("/"):
        log.warning("%s was made for output %s, not %s; reading %s's manifest all the same",
                    rejects_path, rejects.output, store.uri, store.uri)
    sources = [state["manifest"], *(m for m in manifests or () if m != state["manifest"])]
    found, held = find_rows(sources, set(rejects.ids), storage)
    missing = [i for i in rejects.ids if i not in found]
    if missing:
        raise ConfigError(f"{rejects_path}: {_some(missing)} not row(s) of {' or '.join(sources)}; "
                          "name the manifest of an earlier pass with --manifest")
    ledger, assigned = Ledger(store), set()

    def taken(candidate: str) -> bool:
        return candidate in assigned or candidate in held or isinstance(ledger.judge(candidate), CommittedRow)

    renamed = []
    for row_id in found:  # the manifests' order
        try:
            new_id = next_attempt_id(row_id, taken)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        assigned.add(new_id)
        renamed.append((row_id, new_id))
    uri = write_rerolled([(found[old], new) for old, new in renamed], dest, storage)
    return RerollResult(uri, renamed, sources)


def _rejects(path: str) -> Rejects:
    file = local_path(path)
    try:
        rejects = read_rejects(file.read_bytes(), path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a rejects file") from None
    except RejectsError as exc:
        raise ConfigError(str(exc)) from None
    invalid = [i for i in rejects.ids if not valid_id(i)]
    if invalid:
        raise ConfigError(f"{path}: {_some(invalid)} not valid row id(s) (the manifest's id rules)")
    return rejects


def _some(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN])
    return shown + (f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else "") + (" are" if len(ids) > 1 else " is")


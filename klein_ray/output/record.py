"""The output record: what a row's commit marker (``meta/{id}.json``) says, and the fingerprint
of the render inputs an image carries. Both are the output's contract with its readers
(``status``, ``verify``, exporters, people), so they are built here, as free functions, and the
worker only supplies the facts.

The marker's fields (docs/operations.md lists them for users): id, prompt, variant, model (source,
pipeline, distilled, dtype, device, settings), width, height, steps, guidance, seed, seed source,
format, references (uri, sha256, bytes, width, height), adapters (name, scale, sha256,
always), batch (size, position, ids: what a
bitwise re-render needs), timings, attempt, worker, created_at, versions, manifest (file, row),
passthrough, generated_by_test_model, warnings; the ledger adds ``image`` and ``commit`` when it
commits.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from klein_ray import __version__
from klein_ray.config import JobConfig
from klein_ray.types import RowSpec, WorkUnit
from klein_ray.uris import redact


@dataclass(frozen=True)
class ModelFacts:
    """What the metadata says of the model that rendered a row (the worker's loaded model)."""

    source: str  # as configured (redacted when recorded)
    pipeline: str  # the diffusers pipeline class
    distilled: bool
    dtype: str
    device: str
    settings: dict[str, Any] = field(default_factory=dict)  # accelerator settings in effect
    versions: dict[str, str] = field(default_factory=dict)  # torch, diffusers, transformers
    test_model: bool = False  # random weights: its images are noise, and the record says so


@dataclass(frozen=True)
class RenderFacts:
    """What one row's render produced and how (besides the image bytes)."""

    width: int
    height: int
    steps: int
    references: list[dict[str, Any]]  # per reference: uri (redacted), sha256, bytes, width, height
    timings: dict[str, float]
    worker: str
    warnings: list[str] = field(default_factory=list)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # per adapter: name, scale, sha256, always


def setup_digest(config: JobConfig, variant: str, source: str, identities: dict[str, str] | None = None) -> str:
    """The variant's setup (16 hex digits): what the job config adds to a row's own values when
    it renders (``source``, normalised: the model; its pipeline, dtype, weights file and
    precision; default steps and guidance; the text length; the output's encoding and default
    format; the adapters fused into every row, ``always``, each by its file's identity from
    ``identities``). A row committed under another setup is *outdated*: ``status`` and
    ``verify`` report it; it is rendered again only when asked (``render --rerender-outdated``).
    A row's own adapters extend it (``row_setup``)."""
    vcfg = config.variants[variant]
    fields = vcfg.model_dump(include={"pipeline", "dtype", "transformer", "precision", "steps",
                                      "guidance", "max_sequence_length"})
    ids = identities or {}
    fused = [[name, vcfg.adapters[name].scale, ids.get(name, "")] for name in vcfg.always]
    setup: dict[str, Any] = {"source": redact(source), "variant": fields, "output": config.output.model_dump()}
    if fused:  # (only when set: the setups of rows rendered before adapters existed stay)
        setup["always"] = fused
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_setup(base: str, adapters: tuple[tuple[str, float], ...], identities: dict[str, str]) -> str:
    """A row's setup: its variant's (``base``) and the adapters it uses, each by name, scale and
    file identity; ``base`` itself for a row without adapters."""
    if not adapters:
        return base
    terms = sorted(f"{name}@{scale!r}={identities.get(name, '')}" for name, scale in adapters)
    return hashlib.sha256(json.dumps([base, terms]).encode()).hexdigest()[:16]


def resolve_adapters(names: object, scales: object, defaults: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """A raw manifest row's adapters as (name, scale), scales defaulting to the configured ones;
    () for anything the row validator would refuse (that row never renders)."""
    if not isinstance(names, (list, tuple)) or not names:
        return ()
    given = list(scales) if isinstance(scales, (list, tuple)) else [None] * len(names)
    if len(given) != len(names) or any(n not in defaults for n in names):
        return ()
    return tuple(sorted((n, float(defaults[n] if s is None else s)) for n, s in zip(names, given)))


def row_metadata(unit: WorkUnit, row: RowSpec, model: ModelFacts, render: RenderFacts,
                 setup: str = "") -> dict[str, Any]:
    """The row's marker, before the ledger adds the image it commits (and the epoch)."""
    return {
        "id": row.id,
        "inputs": row.digest,  # the manifest row it was rendered from (stale when that changes)
        "setup": setup,  # the variant's setup it was rendered under (outdated when that changes)
        "prompt": row.prompt,
        "variant": row.variant,
        "model": {"source": redact(model.source), "pipeline": model.pipeline,
                  "distilled": model.distilled, "dtype": model.dtype, "device": model.device,
                  "settings": model.settings},
        "width": render.width,
        "height": render.height,
        "steps": render.steps,
        "guidance": unit.guidance if not model.distilled else None,
        "seed": row.seed,
        "seed_source": row.seed_source,
        "format": row.format,
        "references": render.references,
        "adapters": render.adapters,
        # What a bitwise re-render needs: the batch it was rendered in.
        "batch": {"size": unit.size, "position": unit.rows.index(row), "ids": [r.id for r in unit.rows]},
        "timings": {k: round(v, 4) for k, v in render.timings.items()},
        "attempt": unit.attempt,  # this row's n-th submission in this run (retries count)
        "worker": render.worker,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "versions": dict(model.versions, klein_ray=__version__, python=platform.python_version()),
        "manifest": {"file": row.manifest_file, "row": row.manifest_row},
        "passthrough": row.passthrough,
        "generated_by_test_model": model.test_model,
        "warnings": render.warnings,
    }


def fingerprint(meta: dict[str, Any], config: JobConfig) -> str:
    """What the user asked for, hashed: two renders with the same fingerprint are the same row
    (an image an earlier attempt left can stand for this one). Batch composition and speed
    settings are left out: they change bits, not what was asked."""
    model = meta["model"]
    inputs = {k: meta[k] for k in ("id", "prompt", "variant", "width", "height", "steps",
                                   "guidance", "seed", "format")}
    vcfg = config.variants[meta["variant"]]
    inputs.update(source=model["source"], pipeline=model["pipeline"], dtype=model["dtype"],
                  references=[r["sha256"] for r in meta["references"]],
                  encode=config.output.model_dump(), max_sequence_length=vcfg.max_sequence_length)
    # Other weights, or fp8 arithmetic, are other inputs (added only when set, so the
    # fingerprints of rows rendered before these settings existed stay as they were).
    if vcfg.transformer:
        inputs["transformer"] = redact(vcfg.transformer)
    if model.get("settings", {}).get("precision") == "fp8":
        inputs["precision"] = "fp8"
    if meta.get("adapters"):
        inputs["adapters"] = [[a["name"], a["scale"], a["sha256"]] for a in meta["adapters"]]
    canonical = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]

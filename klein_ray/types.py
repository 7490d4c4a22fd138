"""Named types that cross package boundaries: a validated row, a work unit, a row's outcome.

Everything that travels between the driver and the workers is one of these dataclasses, so both
sides agree on the fields without sharing code paths or dicts of unknown shape. This module
imports nothing of klein_ray but ``uris`` (its scrubber keeps secrets out of error records):
every other package, the model layer included, may import it.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any

from klein_ray.uris import scrub

# Stages a row passes through; an error record names the one it failed in.
STAGES = ("validate", "fetch", "render", "encode", "store")

# Output formats a row may ask for: the file extension of its image and the content type.
IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# The file `make-tiny-model` writes into a tiny random model's directory: its images are noise,
# and every record of them says so.
TEST_MODEL_MARKER = "klein_ray_tiny.json"

# One cap for every error message recorded (errors table, report, validate's output).
MESSAGE_CAP = 500


@dataclass(frozen=True)
class RowSpec:
    """One validated manifest row, with every default resolved except reference-derived sizes."""

    id: str
    prompt: str
    variant: str
    references: tuple[str, ...]  # normalised URIs (s3://, http(s)://, file://)
    width: int | None  # None: from the first reference (diffusers' rule) or 1024
    height: int | None
    steps: int | None  # None: the model's default (4 distilled, 50 base)
    guidance: float
    seed: int
    seed_source: str  # "manifest" or "derived"
    format: str  # png | jpeg | webp
    passthrough: dict[str, Any] = field(default_factory=dict)
    manifest_file: str = ""
    manifest_row: int = -1  # 0-based row index within manifest_file
    digest: str = ""  # what the manifest row asks to render (intake.schema.row_digest)
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale) the row asks for
    # `render --verify` found the row broken: its marker's version then ('' if none), which the
    # repair replaces only if it is still that (None: an ordinary row).
    repair: str | None = None
    # Its variant and adapters as the manifest states them (intake.schema.setup_group): the
    # checkpoint records it, so a resume computes the row's setup per group, not per row.
    group: str = ""


@dataclass(frozen=True)
class WorkUnit:
    """Rows that share one diffusers call: same variant, size, steps, guidance, references and
    adapters (with their scales).

    A retried unit is a subset of an earlier one's rows (units are split, never merged), so its
    rows share one history: ``attempt`` (this is their n-th submission in this run), and how
    often they failed (``failures``) or lost their worker (``losses``).
    """

    unit_id: int
    variant: str
    width: int | None
    height: int | None
    steps: int | None
    guidance: float
    references: tuple[str, ...]
    rows: tuple[RowSpec, ...]
    attempt: int = 1
    failures: int = 0
    losses: int = 0
    adapters: tuple[tuple[str, float], ...] = ()  # the rows' LoRA adapters (name, scale), shared

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass
class RowError:
    """A row that could not be committed, with the stage it failed in and why."""

    id: str
    stage: str
    error_type: str
    message: str
    attempts: int = 1
    manifest_file: str = ""
    manifest_row: int = -1
    column: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        self.message = scrub(self.message)  # recorded in errors.parquet and the report
        if len(self.message) > MESSAGE_CAP:
            self.message = self.message[: MESSAGE_CAP - 3] + "..."

    @classmethod
    def for_row(cls, row: RowSpec, stage: str, error_type: str, message: str,
                attempts: int = 1, column: str = "") -> RowError:
        """An error about a validated row (its manifest position comes from the row)."""
        return cls(row.id, stage, error_type, message, attempts, row.manifest_file,
                   row.manifest_row, column)

    @classmethod
    def from_exception(cls, row: RowSpec, stage: str, exc: BaseException,
                       attempts: int = 1) -> RowError:
        """The one way an exception becomes a row's error: its type, and its message's first
        line (tracebacks and multi-line server answers stay out of the records)."""
        return cls.for_row(row, stage, type(exc).__name__, first_line(exc), attempts)


@dataclass
class RowResult:
    """A row committed by a worker: what was written and how long each stage took."""

    id: str
    variant: str
    image_key: str
    meta_key: str
    sha256: str
    bytes: int
    width: int
    height: int
    seed: int
    prompt: str
    timings: dict[str, float]
    worker: str
    thumbnail: builtins.bytes = b""  # a small JPEG for the contact sheet; never stored per row
    already: bool = False  # committed by an earlier attempt (found by the marker check)
    inputs: str = ""  # the row digest it was rendered from (its marker's ``inputs``)
    setup: str = ""  # the variant setup it was rendered under (its marker's ``setup``)
    # (sha256, small JPEG) of each reference it was made from, for the review sheet; not stored per row
    reference_thumbnails: tuple[tuple[str, builtins.bytes], ...] = ()


@dataclass
class UnitOutcome:
    """What a worker returns for one work unit: every row is either a result or an error."""

    unit_id: int
    results: list[RowResult] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RenderOOM(RuntimeError):
    """The accelerator ran out of memory on a batch: retry it as smaller batches."""

"""What a render worker is started from: ``WorkerSpec``, sent to every worker of a variant.

Built by the driver's pool start-up (``scheduling.pools``) and handed through the executor to
each worker, so both sides agree on it without the driver importing the worker itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from klein_ray.config import JobConfig


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to load its variant and commit rows."""

    variant: str
    config: JobConfig
    output_uri: str
    source: str  # normalised: absolute local path, s3:// prefix or Hub repo id
    threads: int | None
    # True only when OUT held no marker and no image when the job began: nothing there can be
    # an earlier attempt of a row, so workers skip the marker check and leftover clean-up.
    output_was_empty: bool = False
    # The job's most common planned (width, height, references) for this variant, most common
    # first: what a compiling worker warms up at load (see klein_ray.model.accel.warmup_plan).
    warmup_sizes: tuple[tuple[int, int, int], ...] = ()
    # The lease epoch of the run that started the worker: every image and marker it writes
    # carries it, and it never replaces what a newer epoch wrote (output.ledger).
    epoch: int = 0
    rerender_outdated: bool = False  # replace rows committed under another setup of the variant
    # The identity of each of the variant's LoRA files (name, identity), read once by the driver
    # so that every worker's setup digests agree with the driver's (assets.adapters.identity).
    adapter_identities: tuple[tuple[str, str], ...] = ()

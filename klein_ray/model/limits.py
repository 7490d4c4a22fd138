"""What diffusers' FLUX.2 klein pipeline accepts, as plain numbers and one check (no torch).

The model layer enforces these before a call (so a bad request fails as a row error instead of
mid-batch, or silently altered); ``validate --check-references`` reports the same reasons
without loading a model.
"""

from __future__ import annotations

SIDE_MULTIPLE = 16  # output sides that are not multiples are floored by diffusers with a warning
MIN_SIDE = 64
MIN_REF_SIDE = 64  # diffusers' Flux2 image processor rejects smaller references
MAX_REF_ASPECT = 8.0


def shape_problem(width: int, height: int) -> str | None:
    """Why a reference of this size would be refused, or None when it is fine."""
    if min(width, height) < MIN_REF_SIDE:
        return f"reference is {width}x{height}; each side must be at least {MIN_REF_SIDE} px"
    if max(width, height) / min(width, height) > MAX_REF_ASPECT:
        return f"reference is {width}x{height}; aspect ratio must be at most 8:1"
    return None


def side_problem(side: int | None) -> str | None:
    """Why an output side would be refused or altered, or None when it is fine (None: default)."""
    if side is not None and (side % SIDE_MULTIPLE or side < MIN_SIDE):
        return f"output sides must be multiples of {SIDE_MULTIPLE}, at least {MIN_SIDE}; got {side}"
    return None

"""Row validation: one manifest row (a dict from Parquet) becomes a ``RowSpec`` or ``RowError``s.

Every check names the column and the reason, so `validate` can print all of a row's problems
at once and `render` can record the first in the errors table. The id pattern checked here is
what keeps every output key (``output.layout``) inside OUT.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from pathlib import Path
from typing import Any

from klein_ray.config import JobConfig
from klein_ray.intake.schema import KNOWN_COLUMNS, row_digest, setup_group
from klein_ray.types import IMAGE_EXTENSIONS, RowError, RowSpec
from klein_ray.uris import FILE, HTTP, S3, parse

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The manifest's bounds on output sides (docs/configuration.md). They must sit inside what the
# model accepts (model/limits.py, which this package does not import: the driver reads rows and
# stays clear of the model); tests/test_rows.py checks that they do.
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 16
MAX_SEED = 2**63 - 1
LABEL_CHARS = 160  # the most characters of an invalid id an error record keeps


def derive_seed(row_id: str) -> int:
    """The seed of a row that gives none: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"klein-ray/seed/{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def valid_id(row_id: object) -> bool:
    return isinstance(row_id, str) and ID_PATTERN.fullmatch(row_id) is not None


def duplicate_id_error(row_id: str, file: str, index: int) -> RowError:
    """The error of a row whose id another row of the manifest shares (prescan finds them)."""
    return RowError(row_id, "validate", "DuplicateId", "id occurs more than once in the manifest; "
                    "every row with it is rejected", 1, file, index, "id")


def normalise_reference(uri: str, base_dir: Path) -> str:
    """A reference as an absolute URI (``klein_ray.uris``); plain paths are resolved against
    ``base_dir``.

    Lexically ('..' and '.' folded), without following symlinks: the worker resolves the path
    when it checks it against ``references.local_roots``, and a refusal then quotes the path as
    written, never a link's target outside the roots."""
    where = parse(uri, accept=(S3, HTTP, FILE), base=base_dir, what="reference")
    return uri if where.kind == HTTP else where.uri


class RowValidator:
    """Validates rows against the manifest's rules and the job config; holds nothing per row."""

    def __init__(self, config: JobConfig, base_dir: Path | None = None):
        self.config = config
        self.base_dir = base_dir or Path.cwd()

    def validate(self, raw: dict[str, Any], file: str, index: int) -> RowSpec | list[RowError]:
        """Return the row as a ``RowSpec``, or every problem found with it."""
        row_id = raw.get("id")
        label = row_id if valid_id(row_id) else _label(row_id, index)
        problems: list[tuple[str, str]] = []

        def bad(column: str, reason: str) -> None:
            problems.append((column, reason))

        # 1. Identity and text.
        if not valid_id(row_id):
            bad("id", _id_reason(row_id))
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            bad("prompt", "prompt is empty or null")

        # 2. Variant, then its defaults.
        variant = raw.get("variant") or self.config.default_variant
        vcfg = self.config.variants.get(variant) if isinstance(variant, str) else None
        if vcfg is None:
            bad("variant", f"unknown variant {variant!r}; the config has {sorted(self.config.variants)}")

        # 3. Geometry and sampling.
        width, height, steps, guidance, seed = self._sampling(raw, bad)
        fmt = raw.get("format") or self.config.output.format
        if not isinstance(fmt, str) or fmt not in IMAGE_EXTENSIONS:
            bad("format", f"unknown format {fmt!r}; use png, jpeg or webp")

        # 4. References: count and scheme here; size, content and address when fetched.
        references = self._references(raw.get("references"), bad)

        # 5. LoRA adapters: names the variant defines, one scale each.
        adapters = _adapters(raw.get("adapters"), raw.get("adapter_scales"), vcfg, bad) if vcfg else ()

        if problems or vcfg is None or not isinstance(row_id, str) or not isinstance(prompt, str):
            return [
                RowError(str(label), "validate", "InvalidRow", reason, 1, file, index, column)
                for column, reason in problems
            ]
        if width is None and height is None and not references:
            width = height = 1024
        elif not references:
            width, height = width or 1024, height or 1024
        return RowSpec(
            id=row_id,
            prompt=prompt,
            variant=variant,
            references=references,
            width=width,
            height=height,
            # None: the worker applies the loaded model's default (4 distilled, 50 base).
            steps=int(steps) if steps is not None else vcfg.steps,
            guidance=float(guidance) if guidance is not None else vcfg.guidance,
            seed=int(seed) if seed is not None else derive_seed(row_id),
            seed_source="manifest" if seed is not None else "derived",
            format=fmt,
            passthrough={k: json_safe(v) for k, v in raw.items() if k not in KNOWN_COLUMNS},
            manifest_file=file,
            manifest_row=index,
            digest=row_digest(raw),
            adapters=adapters,
            group=setup_group(raw),
        )

    def _sampling(self, raw: dict[str, Any], bad) -> tuple:
        width = self._side(raw.get("width"), "width", bad)
        height = self._side(raw.get("height"), "height", bad)
        steps = raw.get("steps")
        if steps is not None and (not _is_int(steps) or steps < 1 or steps > 1000):
            bad("steps", f"steps must be an integer in [1, 1000], got {steps!r}")
        guidance = raw.get("guidance")
        if guidance is not None and (not _is_number(guidance) or not 0 <= guidance <= 100):
            bad("guidance", f"guidance must be a finite number in [0, 100], got {guidance!r}")
        seed = raw.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
            bad("seed", f"seed must be an integer in [0, 2^63-1], got {seed!r}")
        return width, height, steps, guidance, seed

    @staticmethod
    def _side(value: Any, column: str, bad) -> int | None:
        if value is None:
            return None
        if not _is_int(value) or value % SIDE_MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE:
            bad(column, f"{column} must be a multiple of 16 in [64, 2048], got {value!r}")
            return None
        return int(value)

    def _references(self, value: Any, bad) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            bad("references", "references must be a list of URIs")
            return ()
        refs = list(value)
        limit = self.config.references.max_count
        if len(refs) > limit:
            bad("references", f"{len(refs)} references, at most {limit} allowed")
            return ()
        out = []
        for i, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                bad("references", f"reference {i} is empty or not a string")
                continue
            try:
                out.append(normalise_reference(ref.strip(), self.base_dir))
            except ValueError as exc:
                bad("references", f"reference {i}: {exc}")
        return tuple(out)


def _adapters(names: Any, scales: Any, vcfg, bad) -> tuple[tuple[str, float], ...]:
    """The row's adapters as (name, scale): names the variant defines (not its ``always`` ones,
    applied to every row already), no name twice, scales finite and one per name (unset: each
    adapter's configured scale)."""
    if scales is not None and (isinstance(scales, (str, bytes, dict)) or not hasattr(scales, "__iter__")):
        bad("adapter_scales", "adapter_scales must be a list of numbers, one per adapter")
        return ()
    if names is None:
        if scales is not None and len(list(scales)):
            bad("adapter_scales", "adapter_scales given without adapters")
        return ()
    if isinstance(names, (str, bytes, dict)) or not hasattr(names, "__iter__"):
        bad("adapters", "adapters must be a list of adapter names")
        return ()
    names = list(names)
    scales = list(scales) if scales is not None else [None] * len(names)
    if len(scales) != len(names):
        bad("adapter_scales", f"{len(scales)} adapter_scales for {len(names)} adapters: give one per adapter")
        return ()
    out: list[tuple[str, float]] = []
    for name, scale in zip(names, scales):
        if not isinstance(name, str) or name not in vcfg.adapters:
            close = difflib.get_close_matches(str(name), list(vcfg.adapters), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            bad("adapters", f"unknown adapter {name!r}; the variant has {sorted(vcfg.adapters) or 'none'}{hint}")
        elif name in vcfg.always:
            bad("adapters", f"adapter {name!r} is applied to every row of the variant (always): leave it out")
        elif any(name == seen for seen, _ in out):
            bad("adapters", f"adapter {name!r} is named twice")
        elif scale is not None and not (_is_number(scale) and -10 <= scale <= 10):
            bad("adapter_scales", f"adapter {name!r}: scale must be a finite number in [-10, 10], got {scale!r}")
        else:
            out.append((name, float(vcfg.adapters[name].scale if scale is None else scale)))
    return tuple(sorted(out))  # the order names are given in changes nothing: one batch


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(row_id: object, index: int) -> str:
    """What an error record names a row whose id is invalid: the id as written, so that users
    can find the row, with control characters escaped (ids are shown in terminals and HTML) and
    a very long one cut; ``<row N>`` when there is none."""
    if row_id is None or row_id == "":
        return f"<row {index}>"
    text = row_id if isinstance(row_id, str) else repr(row_id)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def json_safe(value: Any) -> Any:
    """A passthrough value the metadata's JSON can hold: NaN and infinities (which JSON lacks)
    become the strings 'nan', 'inf', '-inf'; containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _id_reason(row_id: object) -> str:
    if row_id is None or row_id == "":
        return "id is empty or null"
    if not isinstance(row_id, str):
        return f"id must be a string, got {type(row_id).__name__}"
    if len(row_id) > 128:
        return f"id is {len(row_id)} characters, at most 128 allowed"
    return f"id {row_id!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}} (no spaces, slashes or '..' at the start)"

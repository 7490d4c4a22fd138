"""Accelerator settings: what makes a loaded pipeline fast, decided once and reported as applied.

Owns the choice and the application of regional ``torch.compile``, a channels-last VAE, FP8
linear layers and diffusers' CPU offload; the compile warm-up plan; and the portable compile
artifacts (bytes in, bytes out: whoever keeps them does the I/O).

Defaults ("auto", ``None``): on CUDA, compile the transformer's repeated blocks and put the VAE
in channels-last memory format (measured on an H100: 0.474 -> 0.380 s/image, 4B, 1024², batch
4); elsewhere, or with CPU offload, neither (no measured gain on CPU, and minutes of compiling
for a test model).
``True`` asks for a setting on any device (the CPU runs inductor's C++ backend: how the tests
exercise the compiled path), ``False`` turns it off.

Compiling is bounded: dynamo compiles a block once per new input signature until a dimension
has changed once, then once more with that dimension symbolic ("automatic dynamic shapes"), and
never more than ``RECOMPILE_LIMIT`` times per block: past it the block runs eagerly, correct and
slower. (Not with ``fullgraph=True``, which turns the limit into an error inside a unit; without
it a block with no graph break compiles to the same single graph.) ``warmup_plan`` picks the few
shapes that reach the dynamic graphs before the first unit (sizes, then a partial batch, then
batch 1, which dynamo always specialises), so a job with many sizes compiles about four times
per block, at load, and not inside its units.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from typing import Any, Literal

# Compiles per block function before dynamo runs it eagerly (its default is 8). The count is per
# function, so every compiled model of one architecture in a process shares it (two variants on
# the in-process executor), and a KV model has more paths (reference K/V extracted, reused, none).
RECOMPILE_LIMIT = 16
WARMUP_SIZES = 3  # planned sizes warmed up before the dynamic graph makes the rest free


@dataclass(frozen=True)
class GPUSettings:
    """What the variant asks for; ``None``/'auto' leave the choice to the device (see module)."""

    compile: bool | None = None  # regional torch.compile of the transformer's repeated blocks
    channels_last: bool | None = None  # the VAE in channels-last memory format
    cpu_offload: bool = False  # diffusers' model CPU offload, for cards smaller than the model (CUDA)
    precision: Literal["auto", "bf16", "fp8"] = "auto"  # fp8: see klein_ray.model.fp8


@dataclass(frozen=True)
class WarmupShape:
    """One render call's shape: output size, images in the call, reference images given."""

    width: int
    height: int
    batch: int
    references: int = 0


def resolve(wanted: GPUSettings, device: str, file_fp8: bool) -> dict[str, Any]:
    """The settings in effect on ``device``: booleans, and precision 'fp8' or 'dtype'.
    ``file_fp8``: the transformer's weights came from a float8 checkpoint. Raises ValueError for
    a request the device cannot honour (fp8 on a GPU without FP8 tensor cores)."""
    from klein_ray.model.fp8 import fp8_problem

    cuda = device.startswith("cuda")
    if wanted.precision == "fp8":
        problem = fp8_problem(device)
        if problem:
            raise ValueError(problem)
        precision = "fp8"
    elif wanted.precision == "auto":
        # BFL's fp8 files stay fp8 where the GPU computes in fp8; elsewhere they are dequantized.
        precision = "fp8" if file_fp8 and cuda and fp8_problem(device) is None else "dtype"
    else:
        precision = "dtype"
    # Offloading is for cards too small for the model, where loading dominates: auto leaves the
    # offload hooks uncompiled.
    fast = cuda and not wanted.cpu_offload
    return {
        "compile": fast if wanted.compile is None else bool(wanted.compile),
        "channels_last": fast if wanted.channels_last is None else bool(wanted.channels_last),
        "cpu_offload": bool(wanted.cpu_offload) and cuda,  # offloading to the CPU from the CPU: nothing
        "precision": precision,
    }


def apply(pipe, device: str, applied: dict[str, Any], file_scales: dict[str, float] | None) -> dict[str, Any]:
    """Place ``pipe`` and apply ``applied`` (from ``resolve``) in order: device, fp8, memory
    format, compile (compiling last, so it traces the layers that will run). Returns a report."""
    import torch

    from klein_ray.model.fp8 import quantize_transformer

    # 1. Placement: offload keeps the weights on the host and moves each model in for its turn.
    if applied["cpu_offload"]:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    report: dict[str, Any] = {}

    # 2. FP8 linear layers (quantized where the weights now are: on the GPU that takes seconds).
    if applied["precision"] == "fp8":
        fp8 = quantize_transformer(pipe.transformer, file_scales)
        report["fp8"] = {"layers": fp8.layers, "parameters": fp8.parameters, "skipped": list(fp8.skipped),
                         "kept_from_file": fp8.kept_from_file, "rowwise": fp8.rowwise}

    # 3. Memory format, then regional compilation: each repeated block type once, its graph
    #    shared by every block of that type (not the whole model: minutes less to compile).
    if applied["channels_last"]:
        pipe.vae.to(memory_format=torch.channels_last)
    if applied["compile"]:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        pipe.transformer.compile_repeated_blocks(fullgraph=False)
    return report


def warmup_plan(sizes: list[tuple[int, int, int]], batch: int) -> list[WarmupShape]:
    """The calls that compile, before any unit, the graphs a job with these planned ``sizes``
    ((width, height, references), most common first) and units of up to ``batch`` rows needs."""
    if not sizes:
        return []
    plan = [WarmupShape(w, h, batch, refs) for w, h, refs in dict.fromkeys(sizes[:WARMUP_SIZES])]
    w, h, refs = sizes[0]
    if refs and len(plan) == 1:
        # References come in every size, so their token count varies even when the output's
        # does not: a second size now makes the sequence symbolic at load, not in a unit.
        plan.append(WarmupShape(w, h + 64, batch, refs))
    if batch > 2:
        plan.append(WarmupShape(w, h, batch - 1, refs))  # partial units: batch becomes symbolic
    if batch > 1:
        plan.append(WarmupShape(w, h, 1, refs))  # dynamo specialises size 1: its own graph
    return plan


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (warm-up and later)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def fresh_compiles() -> int:
    """Graphs inductor compiled in this process because no cache held them."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


def artifact_key(pipe, device: str, applied: dict[str, Any]) -> str:
    """A name for this process's compile artifacts: what compiled code depends on (torch, the
    device, the transformer's architecture and dtype, the settings). Inductor checks each entry's
    own hash when loading, so a key that is too coarse wastes space, never correctness."""
    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    facts = {"torch": torch.__version__, "python": platform.python_version(), "device": gpu,
             "pipeline": type(pipe).__name__, "transformer": dict(pipe.transformer.config),
             "dtype": str(pipe.transformer.dtype), "settings": applied}
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def save_artifacts() -> bytes | None:
    """Everything this process compiled, portable to another process or machine (PyTorch's
    "mega-cache"), or None when nothing was compiled."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved and saved[0] else None


def load_artifacts(data: bytes) -> bool:
    """Seed this process's compile caches with ``save_artifacts`` bytes; False when unusable
    (another torch version, say). Call before the first compiled call."""
    import torch

    try:
        return torch.compiler.load_cache_artifacts(data) is not None
    except Exception:  # noqa: BLE001 - a damaged or foreign blob must only cost a compile
        return False

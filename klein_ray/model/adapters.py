"""LoRA adapters on a loaded pipeline: checked, loaded once, switched per render call.

Every adapter of a variant is loaded when the model is (diffusers' ``load_lora_weights`` with an
``adapter_name``, which needs peft); ``always`` adapters are then fused into the weights (no
cost per call; fusing in float32 on the CPU is exact to the last bits that matter, in bf16 it
rounds once). Per call, ``apply`` makes the call's adapters (name, scale) the active ones
(``set_adapters``), or turns LoRA off for a call with none, doing nothing when the set is the
one already active: switching reloads no weights.

On a compiled model (regional ``torch.compile`` of the repeated blocks), dynamo guards on which
adapters are active and on their scales: each new (adapter set, scales) traces the blocks once
more (two graphs on the tiny model), and switching back to a set seen before traces nothing
(``benchmarks/adapters.py --dynamo`` measures it). diffusers' hotswap (``enable_lora_hotswap``)
does not change that: it swaps new weights into one adapter slot, it does not make switching
between loaded adapters guard-free (measured: the same graphs with it). So a compiled variant
compiles once per distinct combination its rows use, up to the compile limit per block, past
which those calls run uncompiled (correct, slower); the planner's grouping keeps switches to one
per unit. A variant with many combinations should fuse its common adapter (``always``) or not
compile.

Before loading, each file is checked against the transformer (its header only): every LoRA
layer must name a module of this transformer, with matching input and output sizes. A file for
another base model fails here, naming the file and the first layer that does not fit, instead
of being loaded half (diffusers skips keys it does not know with a warning). No I/O but reading
the local files given.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AdapterError(ValueError):
    """An adapter that does not fit the model (the variant fails to load, naming the file)."""


@dataclass(frozen=True)
class Adapter:
    """A LoRA file for the model layer: its name, its local path, its default scale."""

    name: str
    path: str
    scale: float = 1.0


def check(transformer, adapter: Adapter) -> None:
    """Every ``lora_A``/``lora_B`` pair in the file fits a linear layer of ``transformer``."""
    shapes = _header_shapes(Path(adapter.path))
    modules = dict(transformer.named_modules())
    layers = 0
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key:
            continue
        layers += 1
        module_name = key.split(".lora_A.")[0].removeprefix("transformer.")
        module = modules.get(module_name)
        if module is None or not hasattr(module, "in_features"):
            raise AdapterError(f"{adapter.path}: layer {module_name!r} is not a linear layer of this "
                               "model's transformer (an adapter for another base model?)")
        b_shape = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if shape[-1] != module.in_features or b_shape is None or b_shape[0] != module.out_features:
            raise AdapterError(f"{adapter.path}: layer {module_name!r} is {shape[-1]} -> "
                               f"{b_shape[0] if b_shape else '?'} in the file, {module.in_features} -> "
                               f"{module.out_features} in the model (an adapter for another base model?)")
    if not layers:
        raise AdapterError(f"{adapter.path}: no LoRA layers (lora_A / lora_B weights) in this file")


def load(pipe, adapters: list[Adapter], always: list[str]) -> None:
    """Check and load every adapter into ``pipe``, fuse the ``always`` ones, and leave LoRA off
    until a call asks for adapters."""
    if not adapters:
        return
    for adapter in adapters:
        check(pipe.transformer, adapter)
    by_name = {a.name: a for a in adapters}
    for name in always:  # first, alone: fused, then unloaded (the weights keep them)
        _load_one(pipe, by_name[name])
    if always:
        pipe.set_adapters(list(always), [by_name[n].scale for n in always])
        pipe.fuse_lora(adapter_names=list(always), lora_scale=1.0)
        pipe.unload_lora_weights()
    others = [a for a in adapters if a.name not in always]
    for adapter in others:
        _load_one(pipe, adapter)
    if others:
        pipe.disable_lora()  # until a call names some


def _load_one(pipe, adapter: Adapter) -> None:
    path = Path(adapter.path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter.name)


class AdapterSwitch:
    """Which adapters are active on the pipeline now; ``apply`` changes only what differs."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.active: tuple[tuple[str, float], ...] = ()

    def apply(self, adapters: tuple[tuple[str, float], ...]) -> bool:
        """Make ``adapters`` (name, scale) the active set; True if anything changed."""
        if adapters == self.active:
            return False
        if adapters:
            if not self.active:
                self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in adapters], [s for _, s in adapters])
        else:
            self.pipe.disable_lora()
        self.active = adapters
        return True


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors file's header (the weights are not read)."""
    try:
        with open(path, "rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header: dict[str, Any] = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}

"""Writes tiny transformer checkpoints exactly in BFL's single-file layout (= ComfyUI's), for tests.

From a diffusers Flux2 transformer state dict: BFL's key names (``klein_ray.model.bflkeys``, whose
round trip through diffusers' converter is tested), then every 2-D weight inside the blocks
quantized as BFL's published files are, the rest kept in bf16:

- fp8: ``float8_e4m3fn`` weight, ``weight_scale`` = amax / 448 (one float32 per tensor);
- nvfp4: uint8 weight of E2M1 pairs (even element in the high nibble), ``weight_scale`` one
  float8_e4m3fn per 16 elements in cuBLAS' tiled layout (built here from the documented index
  formula, independently of the loader's reshape), ``weight_scale_2`` = amax / (448 * 6);
- which layers are quantized: ``_quantization_metadata`` in the header (as BFL's files do) or
  one ``.comfy_quant`` uint8 JSON tensor per layer (as ComfyUI saves).

Alongside the file, ``write`` returns what each weight dequantizes to, computed from the codes and
scales before packing and swizzling, so a test can check the loader against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from klein_ray.model import bflkeys

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_MAX, FP4_MAX = 448.0, 6.0


def quantize_fp8(weight: torch.Tensor):
    """(fp8 weight, scalar scale, what it dequantizes to)."""
    scale = (weight.abs().max().float() / FP8_MAX).reshape(())
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of every value (bit 3 the sign)."""
    magnitudes = E2M1[:8]
    nearest = (x.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1).to(torch.uint8)
    return nearest | ((x < 0).to(torch.uint8) << 3)


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) -> cuBLAS' tiled layout, padded to 128 x 4, from the documented formula:
    tile (r // 128, c // 4), row-major tiles of 512, offset (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    r = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    c = torch.arange(cols).unsqueeze(0).expand(rows, cols)
    index = ((r // 128) * col_tiles + c // 4) * 512 + (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4
    out = torch.zeros(row_tiles * 128 * col_tiles * 4, dtype=scales.dtype)
    out[index.reshape(-1)] = scales.reshape(-1)
    return out.reshape(row_tiles * 128, col_tiles * 4)


def quantize_nvfp4(weight: torch.Tensor):
    """(packed uint8, swizzled fp8 block scales, float32 tensor scale, what it dequantizes to).
    Rows and columns must be multiples of 16 (the tiny model's are)."""
    rows, cols = weight.shape
    x = weight.float().reshape(rows, cols // 16, 16)
    tensor_scale = (x.abs().max() / (FP8_MAX * FP4_MAX)).reshape(())
    blocks = (x.abs().amax(dim=-1) / FP4_MAX / tensor_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    total = tensor_scale * blocks.float()
    safe = torch.where(total == 0, torch.ones_like(total), total)
    codes = e2m1_codes((x / safe.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)).reshape(rows, cols)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # even element in the high nibble
    dense = (E2M1[codes.long()].reshape(rows, cols // 16, 16) * total.unsqueeze(-1)).reshape(rows, cols)
    return packed, swizzle(blocks), tensor_scale, dense


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    # BFL quantizes the blocks' linear layers; embedders, modulation and the final layer stay bf16.
    return name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") \
        and tensor.dim() == 2


def bfl_tensors(state: dict[str, torch.Tensor], fmt: str):
    """(file tensors by BFL name, layer formats, dequantized float32 tensors by BFL name)."""
    tensors, layers, dense = {}, {}, {}
    for name, tensor in to_bfl(state).items():
        layer = name.removesuffix(".weight")
        if fmt == "fp8" and is_quantized(name, tensor):
            q, scale, dense[name] = quantize_fp8(tensor)
            tensors.update({name: q, f"{layer}.weight_scale": scale})
            layers[layer] = {"format": "float8_e4m3fn"}
        elif fmt == "nvfp4" and is_quantized(name, tensor):
            packed, blocks, scale, dense[name] = quantize_nvfp4(tensor)
            tensors.update({name: packed, f"{layer}.weight_scale": blocks, f"{layer}.weight_scale_2": scale})
            layers[layer] = {"format": "nvfp4"}
        else:
            tensors[name] = tensor.to(torch.bfloat16)
            dense[name] = tensors[name].float()
    return tensors, layers, dense


def write(path: Path, state: dict[str, torch.Tensor], fmt: str, markers: str = "metadata",
          prefix: str = "") -> dict[str, torch.Tensor]:
    """Write ``state`` (diffusers names) as a BFL file in ``fmt`` (bf16, fp8, nvfp4); returns the
    dequantized float32 weights under diffusers' names: what loading the file must give."""
    tensors, layers, dense = bfl_tensors(state, fmt)
    save(path, tensors, layers, markers, prefix)
    return convert_flux2_transformer_checkpoint_to_diffusers(dense)


def save(path: Path, tensors: dict, layers: dict, markers: str = "metadata", prefix: str = "") -> Path:
    tensors = {f"{prefix}{k}": v.contiguous() for k, v in tensors.items()}
    metadata = None
    if markers == "metadata":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    else:
        for layer, conf in layers.items():
            tensors[f"{prefix}{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata)
    return path


def to_bfl(state: dict[str, Any]) -> dict[str, Any]:
    """A diffusers Flux2 transformer state dict in BFL's layout (tensors shared where possible)."""
    import torch

    out = {}
    for name, keys in bflkeys.plan(state).items():
        tensor = state[keys[0]] if len(keys) == 1 else torch.cat([state[k] for k in keys], dim=0)
        out[name] = bflkeys.swap_halves(tensor) if name == bflkeys.SWAPPED else tensor
    return out

"""Single-file FLUX.2 transformer checkpoints in BFL's (= ComfyUI's) layout: bf16, fp8 and nvfp4.

BFL publishes ``black-forest-labs/FLUX.2-klein-{4b,9b,base-4b,base-9b}-{fp8,nvfp4}`` as one
safetensors file holding only the transformer, with BFL's key names and ComfyUI's quantization
layout, which diffusers cannot load. This module owns turning such a file into a
``Flux2Transformer2DModel``: it reads the one local file it is given (no other I/O; the
transformer's config comes through diffusers' ``load_config``, as ``from_pretrained`` would fetch
it), dequantizes every quantized layer to the pipeline's dtype, maps BFL's names to diffusers'
(diffusers' own converter) and loads the result with ``strict=True``: every tensor of the model
comes from the file and every tensor of the file is used. Anything it cannot account for (an
unknown format, a missing scale, a shape that does not fit the model) raises
``CheckpointError`` naming the file and the layer.

The layout, as ComfyUI reads it (``comfy/ops.py`` ``_load_quantized_module``, ``comfy/utils.py``
``convert_old_quants``, ``comfy/quant_ops.py`` ``QUANT_ALGOS``; comfy-kitchen's
``backends/eager/quantization.py`` and ``float_utils.py`` for the NVFP4 bits):

- which layers are quantized: the header metadata ``_quantization_metadata`` =
  ``{"format_version": "1.0", "layers": {layer: {"format": ...}}}``, and/or one uint8 tensor
  ``{layer}.comfy_quant`` per layer holding the same JSON (what ComfyUI itself saves);
- ``float8_e4m3fn`` / ``float8_e5m2``: ``weight`` in that dtype, ``weight_scale`` float32
  (one per tensor in BFL's files; per row also accepted); weight = ``weight * weight_scale``;
- ``nvfp4``: ``weight`` uint8, two E2M1 codes per byte, the EVEN element in the HIGH nibble
  (comfy-kitchen's ``hi_first=True``, its only packing until 2026-04 and still its default);
  shape padded to multiples of 16 then halved along columns. ``weight_scale``: one float8_e4m3fn
  scale per 16 consecutive elements of a row, stored in cuBLAS' tiled ("swizzled") layout,
  padded to 128 rows x 4 columns of scales. ``weight_scale_2``: one float32 per tensor.
  weight = E2M1 value * (weight_scale_2 * block scale). Optional ``pre_quant_scale`` (per input
  channel, multiplied into the activations) is folded into the weight;
- ``input_scale`` (a static activation scale for FP8/FP4 matmuls) means nothing once the weight
  is dequantized and is dropped.

Dequantization runs on the CPU in float32 and rounds once to the target dtype (ComfyUI's fallback
multiplies in bf16, so its weights may differ from ours in the last bit). Where the model runs in
fp8 (``klein_ray.model.fp8``), each float8_e4m3fn layer's per-tensor scale, read with its weight,
goes to the quantizer (``LoadedTransformer.fp8_scales``), which recovers the file's own float8
codes exactly. NVFP4 weights are always
dequantized (no FP4 GEMM is used, Blackwell included).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from klein_ray.model import bflkeys

PREFIX = "model.diffusion_model."  # ComfyUI's full-checkpoint prefix; BFL's files have none
METADATA_KEY = "_quantization_metadata"
MARKER = ".comfy_quant"
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
FORMATS = (*FP8_FORMATS, "nvfp4")
QUANT_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale",
                  ".scale_weight", ".scale_input")
# E2M1: sign bit 3, then 2 exponent and 1 mantissa bits (OCP MX spec; comfy-kitchen's E2M1_LUT).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
NVFP4_BLOCK = 16  # elements of a row sharing one block scale
TILE_ROWS, TILE_COLS = 128, 4  # one cuBLAS scale tile: 128 rows x 4 block-scale columns


class CheckpointError(ValueError):
    """A single-file transformer checkpoint that cannot be loaded; the message names the layer."""


@dataclass
class FileWeights:
    """What a file holds: dense tensors under BFL's names, and the per-tensor scale of each
    layer stored as float8_e4m3fn with one scale (BFL's fp8 files: every block linear)."""

    tensors: dict[str, Any]
    fp8_scales: dict[str, float]  # BFL layer name -> scale


@dataclass
class LoadedTransformer:
    """The transformer, and ``fp8_scales`` under diffusers' module names: what lets an fp8
    model keep the file's own float8 codes (``klein_ray.model.fp8``)."""

    model: Any
    fp8_scales: dict[str, float]


def load_transformer(config_source: str, path: str, dtype) -> LoadedTransformer:
    """A ``Flux2Transformer2DModel`` with ``config_source``'s transformer config (a diffusers
    directory or Hub repo id) and every weight from the BFL-layout file at local ``path``."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    # 1. The model's skeleton on the meta device: its shapes tell what the file must hold, and
    #    the base checkpoint's own transformer weights are never read.
    config = Flux2Transformer2DModel.load_config(config_source, subfolder="transformer")
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # 2. Dense tensors under BFL's names, checked against those shapes, then diffusers' names.
    weights = read_checkpoint(path, bflkeys.bfl_shapes(shapes), dtype)
    try:
        state = convert_flux2_transformer_checkpoint_to_diffusers(weights.tensors)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: diffusers' FLUX.2 key conversion failed: {exc!r}") from None

    # 3. Every parameter replaced (assign: no copy into meta tensors); strict: nothing left over.
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not fit the transformer: {exc}") from None
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: no weights for {left[:5]}")
    return LoadedTransformer(model.eval(), _module_scales(model, weights.fp8_scales))


def _module_scales(model, scales: dict[str, float]) -> dict[str, float]:
    """BFL layer scales under diffusers' module names; a fused BFL QKV layer gives its scale to
    each of diffusers' Q, K and V projections."""
    out = {}
    for name, module in model.named_modules():
        if not name or getattr(module, "weight", None) is None:
            continue
        try:
            layer = bflkeys.bfl_key(f"{name}.weight")[0].removesuffix(".weight")
        except KeyError:  # a module with no BFL counterpart holds no file weight
            continue
        if layer in scales:
            out[name] = scales[layer]
    return out


def read_checkpoint(path: str, expected: dict[str, tuple[int, ...]], dtype) -> FileWeights:
    """Every tensor of the file under BFL's names, dequantized to ``dtype``; ``expected`` (BFL
    name -> shape) is what the model needs, and the file must hold exactly that."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return _read(path, handle, expected, dtype)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None


def _read(path: str, handle, expected: dict[str, tuple[int, ...]], dtype) -> FileWeights:
    names = _names(path, list(handle.keys()))
    formats = layer_formats(path, handle.metadata() or {}, names, handle.get_tensor)
    out: dict[str, Any] = {}
    scales: dict[str, float] = {}
    used = {f"{layer}{MARKER}" for layer in formats}

    # 1. Quantized layers: the weight and its companions together, dequantized.
    for layer, fmt in formats.items():
        weight = f"{layer}.weight"
        if weight not in expected:
            raise CheckpointError(f"{path}: layer {layer!r} ({fmt}) is not part of the transformer")

        def get(suffix: str, layer=layer):
            name = f"{layer}.{suffix}"
            used.add(name)
            return handle.get_tensor(names[name]) if name in names else None

        try:
            out[weight] = dequantize(fmt, get, expected[weight]).to(dtype)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: layer {layer!r} ({fmt}): {exc}") from None
        scale = get("weight_scale")  # (dequantize has checked it is there)
        if fmt == "float8_e4m3fn" and scale.numel() == 1:
            scales[layer] = float(scale.float().reshape(()))

    # 2. Everything else must be a plain floating-point tensor.
    for name, key in names.items():
        if name in used or name in out:
            continue
        if name.endswith(QUANT_SUFFIXES) or name == "scaled_fp8":
            raise CheckpointError(f"{path}: {name!r} is a quantization tensor that no layer's "
                                  "format uses (a layer without comfy_quant, or a scale its format "
                                  "has no use for; legacy 'scaled_fp8' files are not supported)")
        tensor = handle.get_tensor(key)
        if not tensor.is_floating_point() or tensor.element_size() == 1:
            raise CheckpointError(f"{path}: {name!r} is stored as {tensor.dtype} but no "
                                  "comfy_quant format says how to read it")
        out[name] = tensor.to(dtype)
    _check_shapes(path, out, expected)
    return FileWeights(out, scales)


def _names(path: str, keys: list[str]) -> dict[str, str]:
    """BFL name -> key in the file (ComfyUI's ``model.diffusion_model.`` prefix dropped)."""
    names: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(PREFIX)
        if name in names:
            raise CheckpointError(f"{path}: {name!r} is stored twice (with and without {PREFIX!r})")
        names[name] = key
    return names


def layer_formats(path: str, metadata: dict[str, str], names: dict[str, str],
                  get_tensor: Callable[[str], Any]) -> dict[str, str]:
    """Layer -> quantization format, from the header metadata and the ``comfy_quant`` tensors."""
    found: dict[str, str] = {}

    def add(layer: str, conf: Any, where: str) -> None:
        fmt = conf if isinstance(conf, str) else conf.get("format") if isinstance(conf, dict) else None
        if not isinstance(fmt, str):
            raise CheckpointError(f"{path}: layer {layer!r}: no quantization format in {where}")
        if fmt not in FORMATS:
            raise CheckpointError(f"{path}: layer {layer!r}: quantization format {fmt!r} is not "
                                  f"supported (supported: {', '.join(FORMATS)})")
        layer = layer.removeprefix(PREFIX)
        if found.setdefault(layer, fmt) != fmt:
            raise CheckpointError(f"{path}: layer {layer!r}: formats {found[layer]!r} and {fmt!r} disagree")

    if METADATA_KEY in metadata:
        try:
            layers = json.loads(metadata[METADATA_KEY])["layers"]
            items = list(layers.items())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path}: header metadata {METADATA_KEY!r} is not "
                                  '{"layers": {layer: {"format": ...}}}') from None
        for layer, conf in items:
            add(layer, conf, METADATA_KEY)
    for name, key in names.items():
        if name.endswith(MARKER):
            raw = get_tensor(key)
            try:
                conf = json.loads(raw.numpy().tobytes().rstrip(b"\x00").decode("utf-8"))
            except (ValueError, UnicodeDecodeError, TypeError):
                raise CheckpointError(f"{path}: {name!r} is not JSON") from None
            add(name[: -len(MARKER)], conf, name)
    return found


def dequantize(fmt: str, get: Callable[[str], Any], shape: tuple[int, ...]):
    """One layer's weight, dense float32 of ``shape``; ``get(suffix)`` reads the layer's tensors
    (None when absent)."""
    weight = get("weight")
    if weight is None:
        raise CheckpointError("no weight tensor")
    get("input_scale")  # an activation scale: meaningless for a dequantized weight
    scale = get("weight_scale")
    if scale is None:
        raise CheckpointError("missing weight_scale")
    if fmt in FP8_FORMATS:
        return dequantize_fp8(weight, scale, shape, fmt)
    tensor_scale = get("weight_scale_2")
    if tensor_scale is None:
        raise CheckpointError("missing weight_scale_2 (the per-tensor scale)")
    dense = dequantize_nvfp4(weight, scale, tensor_scale, shape)
    pre = get("pre_quant_scale")
    if pre is not None:
        # ComfyUI multiplies the input by it: x*s @ W.T == x @ (W * s).T, so fold it in.
        if pre.numel() != shape[1]:
            raise CheckpointError(f"pre_quant_scale has {pre.numel()} values for {shape[1]} inputs")
        dense = dense * pre.float().reshape(1, -1)
    return dense


def dequantize_fp8(weight, scale, shape: tuple[int, ...], fmt: str = "float8_e4m3fn"):
    """``weight * weight_scale`` in float32: one scale per tensor, or one per row."""
    import torch

    if weight.dtype != getattr(torch, fmt):
        raise CheckpointError(f"weight is {weight.dtype}, the format says {fmt}")
    if tuple(weight.shape) != tuple(shape):
        raise CheckpointError(f"weight shape {tuple(weight.shape)}, the model needs {tuple(shape)}")
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif len(shape) == 2 and scale.numel() == shape[0] and scale.dim() <= 2:
        scale = scale.reshape(shape[0], 1)
    else:
        raise CheckpointError(f"weight_scale of shape {tuple(scale.shape)} is neither per tensor "
                              f"nor per row of {tuple(shape)}")
    return weight.float() * scale


def dequantize_nvfp4(packed, block_scale, tensor_scale, shape: tuple[int, ...]):
    """NVFP4 -> float32 of ``shape`` (the padding ComfyUI adds is cut off)."""
    import torch

    rows, cols = _nvfp4_geometry(packed, shape)
    if block_scale.dtype == torch.uint8:  # ComfyUI views raw bytes as float8_e4m3fn too
        block_scale = block_scale.view(torch.float8_e4m3fn)
    if block_scale.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"weight_scale is {block_scale.dtype}, expected float8_e4m3fn")
    blocks = cols // NVFP4_BLOCK
    tiled = _ceil(rows, TILE_ROWS) * TILE_ROWS * _ceil(blocks, TILE_COLS) * TILE_COLS
    if block_scale.numel() != tiled:
        raise CheckpointError(f"weight_scale has {block_scale.numel()} block scales; a {rows}x{cols} "
                              f"weight needs {tiled} (cuBLAS tiles of 128x4)")
    if tensor_scale.numel() != 1:
        raise CheckpointError(f"weight_scale_2 has {tensor_scale.numel()} values, expected 1")
    scales = unswizzle(block_scale.float(), rows, blocks)  # (rows, blocks)
    total = tensor_scale.float().reshape(()) * scales  # comfy-kitchen's order: tensor * block
    values = unpack_e2m1(packed).reshape(rows, blocks, NVFP4_BLOCK)
    dense = (values * total.unsqueeze(-1)).reshape(rows, cols)
    return dense[: shape[0], : shape[1]].contiguous()


def _nvfp4_geometry(packed, shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and (unpacked) columns of a packed weight, checked against the model's shape."""
    import torch

    if packed.dtype != torch.uint8 or packed.dim() != 2 or len(shape) != 2:
        raise CheckpointError(f"weight is {packed.dtype} {tuple(packed.shape)}, expected a 2-D "
                              f"uint8 of packed E2M1 pairs for a weight of {tuple(shape)}")
    rows, cols = packed.shape[0], packed.shape[1] * 2
    padded = (_ceil(shape[0], 16) * 16, _ceil(shape[1], 16) * 16)
    if rows not in (shape[0], padded[0]) or cols != padded[1]:
        raise CheckpointError(f"packed weight {tuple(packed.shape)} does not hold {tuple(shape)} "
                              f"(expected {(padded[0], padded[1] // 2)})")
    return rows, cols


def unpack_e2m1(packed):
    """uint8 pairs -> float32 values, twice as many columns; element 2i is byte i's HIGH nibble."""
    import torch

    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    pairs = torch.stack([lut[codes >> 4], lut[codes & 0x0F]], dim=1)  # byte -> (even, odd)
    values = torch.nn.functional.embedding(packed.to(torch.int32), pairs)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def unswizzle(blocked, rows: int, cols: int):
    """cuBLAS' tiled block-scale layout -> (rows, cols) row-major. Scale (r, c) sits in tile
    (r // 128, c // 4), tiles row-major, each 512 values at (r % 32) * 16 + (r // 32 % 4) * 4 + c % 4
    (cuBLAS docs, "1D block scaling factors layout"; comfy-kitchen's ``from_blocked``)."""
    row_tiles, col_tiles = _ceil(rows, TILE_ROWS), _ceil(cols, TILE_COLS)
    tiles = blocked.reshape(row_tiles, col_tiles, 32, 4, 4)  # [rt, ct, r%32, r//32%4, c%4]
    rowmajor = tiles.permute(0, 3, 2, 1, 4)  # [rt, r//32%4, r%32, ct, c%4]
    return rowmajor.reshape(row_tiles * TILE_ROWS, col_tiles * TILE_COLS)[:rows, :cols]


def _check_shapes(path: str, out: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: not a FLUX.2 transformer of this configuration: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(out[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name!r} has shape {tuple(out[name].shape)}, the "
                                  f"transformer needs {tuple(shape)}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)

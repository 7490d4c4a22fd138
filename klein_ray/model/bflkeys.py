"""FLUX.2 transformer key names: BFL's original layout (also ComfyUI's) and diffusers'.

diffusers owns the BFL -> diffusers direction (``convert_flux2_transformer_checkpoint_to_diffusers``
in ``diffusers.loaders.single_file_utils``); this module owns the inverse, diffusers -> BFL. The
loader of single-file checkpoints needs it to know, before any conversion, which shape every BFL
tensor must have (a packed NVFP4 weight carries only its padded, halved shape), and the tests use
it to write files in BFL's layout from a diffusers model. A test checks that the two directions
are inverse on the whole model.

What differs between the layouts: module names; BFL fuses the double blocks' Q, K and V into one
``qkv`` weight per stream (diffusers splits it in three); norms' parameter is ``scale`` in BFL,
``weight`` in diffusers; and the final adaLN modulation holds (shift, scale) in BFL, (scale, shift)
in diffusers.
"""

from __future__ import annotations

# Modules outside the blocks: diffusers name -> BFL name.
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# Inside a double block (transformer_blocks.N / double_blocks.N).
_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
# diffusers' separate projections -> (BFL's fused module, position along dim 0).
_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
FUSED_PARTS = 3
# Inside a single block (single_transformer_blocks.N / single_blocks.N).
_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
# BFL's modulation of the final layer is (shift, scale); diffusers' is (scale, shift).
SWAPPED = "final_layer.adaLN_modulation.1.weight"


def bfl_key(key: str) -> tuple[str, int]:
    """The BFL key holding diffusers' ``key``, and its position in a fused QKV (else 0)."""
    module, _, param = key.rpartition(".")
    index, name = 0, None
    for prefix, bfl_prefix, table in (("transformer_blocks.", "double_blocks.", _DOUBLE),
                                      ("single_transformer_blocks.", "single_blocks.", _SINGLE)):
        if module.startswith(prefix):
            block, _, inner = module[len(prefix):].partition(".")
            if inner in table:
                name = f"{bfl_prefix}{block}.{table[inner]}"
            elif table is _DOUBLE and inner in _FUSED:
                fused, index = _FUSED[inner]
                name = f"{bfl_prefix}{block}.{fused}"
            break
    else:
        name = _TOP.get(module)
    if name is None:
        raise KeyError(f"no BFL name for diffusers' {key!r}")
    if name.endswith(("query_norm", "key_norm")) and param == "weight":
        param = "scale"  # BFL's RMSNorm calls its parameter 'scale'
    return f"{name}.{param}", index


def plan(keys) -> dict[str, list[str]]:
    """BFL key -> the diffusers keys it is made of, in order along dim 0 (one unless fused)."""
    parts: dict[str, dict[int, str]] = {}
    for key in keys:
        name, index = bfl_key(key)
        parts.setdefault(name, {})[index] = key
    out = {}
    for name, by_index in parts.items():
        if len(by_index) > 1 and sorted(by_index) != list(range(FUSED_PARTS)):
            raise KeyError(f"{name}: fused from {sorted(by_index.values())}, expected Q, K and V")
        out[name] = [by_index[i] for i in sorted(by_index)]
    return out


def bfl_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shape of every BFL tensor, from the shapes of a diffusers model's state dict."""
    out = {}
    for name, keys in plan(shapes).items():
        first = shapes[keys[0]]
        out[name] = (sum(shapes[k][0] for k in keys), *first[1:])
    return out


def swap_halves(tensor):
    """(a, b) -> (b, a) along dim 0: BFL's (shift, scale) <-> diffusers' (scale, shift)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)

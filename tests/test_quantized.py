"""BFL's single-file transformer checkpoints (bf16, fp8, nvfp4) on the tiny real model: the NVFP4
bits by hand, the key mapping's round trip through diffusers' converter, exact renders against
the dequantized weights, loud errors for corrupt files, and a job through the in-process executor."""

from __future__ import annotations

import json

import bflfiles
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from PIL import Image

from klein_ray.model import bflkeys
from klein_ray.model.pipeline import KleinModel, RenderRequest
from klein_ray.model.quantized import CheckpointError, dequantize_nvfp4, unpack_e2m1, unswizzle

REQUEST = RenderRequest(prompts=["a lamp", "a chair"], seeds=[1, 2], width=64, height=64, steps=2, guidance=1.0)


@pytest.fixture(scope="module")
def base(tiny_models):
    return KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=2)


@pytest.fixture(scope="module")
def state(base):
    return {k: v.detach().clone() for k, v in base.pipe.transformer.state_dict().items()}


def load(tiny_models, path) -> KleinModel:
    return KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=2,
                                      transformer_file=str(path))


def pixels(model: KleinModel) -> list[np.ndarray]:
    return [np.asarray(im) for im in model.render(REQUEST).images]


# -- the NVFP4 bits, by hand ----------------------------------------------------------------


def test_e2m1_pairs_unpack_high_nibble_first():
    packed = torch.tensor([[0x1A, 0xF0, 0x78, 0x25]], dtype=torch.uint8)
    # 0x1A: 1 -> 0.5, A (sign + 2) -> -1.0; 0xF0: F -> -6, 0 -> 0; 0x78: 7 -> 6, 8 -> -0; 0x25: 1.0, 3.0
    expected = [0.5, -1.0, -6.0, 0.0, 6.0, -0.0, 1.0, 3.0]
    values = unpack_e2m1(packed)
    assert values.tolist() == [expected]
    assert torch.signbit(values[0, 5])  # -0.0 keeps its sign, as the LUT says


def test_nvfp4_weight_by_hand():
    """A 2x32 weight: two blocks of 16 per row, scales placed by hand in cuBLAS' tiles."""
    packed = torch.zeros(16, 16, dtype=torch.uint8)  # rows padded to 16, 32 columns packed in 16
    packed[0, 0], packed[0, 8] = 0x1A, 0x7F  # row 0: elements 0,1 (block 0) and 16,17 (block 1)
    packed[1, 15] = 0x42  # row 1: elements 30, 31 (block 1)
    blocks = torch.zeros(128 * 4, dtype=torch.float32)
    blocks[0], blocks[1] = 2.0, 0.5  # (row 0, block 0) at 0, (row 0, block 1) at c % 4 = 1
    blocks[16 + 1] = 4.0  # (row 1, block 1): (r % 32) * 16 + c % 4
    weight = dequantize_nvfp4(packed, blocks.to(torch.float8_e4m3fn).reshape(128, 4),
                              torch.tensor(0.25), (2, 32))
    assert weight.shape == (2, 32)
    assert weight[0, :2].tolist() == [0.5 * 0.25 * 2.0, -1.0 * 0.25 * 2.0]
    assert weight[0, 16:18].tolist() == [6.0 * 0.25 * 0.5, -6.0 * 0.25 * 0.5]
    assert weight[1, 30:].tolist() == [2.0 * 0.25 * 4.0, 1.0 * 0.25 * 4.0]
    assert torch.count_nonzero(weight) == 6


def test_unswizzle_inverts_the_documented_cublas_layout():
    scales = torch.arange(300 * 9, dtype=torch.float32).reshape(300, 9)  # 3 x 3 tiles, padded
    tiled = bflfiles.swizzle(scales)
    assert tiled.shape == (384, 12)
    assert tiled.reshape(-1)[(33 % 32) * 16 + (33 // 32) * 4 + 2] == scales[33, 2]
    assert torch.equal(unswizzle(tiled, 300, 9), scales)


def test_padded_nvfp4_weight_is_cut_to_the_model_shape():
    weight = torch.randn(20, 24)
    padded = torch.nn.functional.pad(weight, (0, 8, 0, 12))  # ComfyUI pads to multiples of 16
    packed, blocks, scale, dense = bflfiles.quantize_nvfp4(padded)
    out = dequantize_nvfp4(packed, blocks, scale, (20, 24))
    assert torch.equal(out, dense[:20, :24])
    assert (out - weight).abs().max() < weight.abs().max() / 4  # FP4 is coarse, not wrong


# -- key names ------------------------------------------------------------------------------


def test_key_mapping_round_trips_through_diffusers_converter(state):
    bfl = bflfiles.to_bfl(state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert bflkeys.bfl_shapes({k: tuple(v.shape) for k, v in state.items()}) == \
        {k: tuple(v.shape) for k, v in bfl.items()}
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_key_mapping_covers_the_full_size_4b_with_guidance():
    config = dict(num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=7680, guidance_embeds=True)  # 4B, plus the guidance embedder
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bfl = bflkeys.bfl_shapes(shapes)
    assert bfl["double_blocks.4.txt_attn.qkv.weight"] == (3 * 3072, 3072)
    assert "guidance_in.out_layer.weight" in bfl and "single_blocks.19.linear2.weight" in bfl
    back = convert_flux2_transformer_checkpoint_to_diffusers(bflfiles.to_bfl(model.state_dict()))
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes


# -- loading renders exactly what the dequantized weights render ----------------------------


@pytest.mark.parametrize("fmt,markers,prefix", [
    ("bf16", "metadata", ""), ("fp8", "metadata", ""), ("nvfp4", "metadata", ""),
    ("nvfp4", "tensors", ""), ("fp8", "tensors", "model.diffusion_model."),
])
def test_a_file_renders_exactly_what_its_dequantized_weights_render(tmp_path, tiny_models, base, state,
                                                                     fmt, markers, prefix):
    path = tmp_path / f"klein-{fmt}.safetensors"
    expected = bflfiles.write(path, state, fmt, markers, prefix)
    loaded = load(tiny_models, path)
    # The weights, bitwise: every tensor the dequantized reference has, nothing else.
    got = loaded.pipe.transformer.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    if fmt != "bf16":
        assert any(not torch.equal(expected[k], state[k].to(torch.bfloat16).float()) for k in expected)
    # The pixels, bitwise, against the base pipeline with the same weights loaded directly.
    reference = KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=2)
    reference.pipe.transformer.load_state_dict(expected, strict=True)
    for ours, theirs in zip(pixels(loaded), pixels(reference)):
        assert np.array_equal(ours, theirs)
    assert loaded.info.dtype == "float32" and loaded.pipe.transformer.dtype == torch.float32


def test_pre_quant_scale_is_folded_into_the_weight(tmp_path, tiny_models, state):
    tensors, layers, dense = bflfiles.bfl_tensors(state, "nvfp4")
    layer = "single_blocks.0.linear2"
    smooth = torch.linspace(0.5, 2.0, dense[f"{layer}.weight"].shape[1])
    tensors[f"{layer}.pre_quant_scale"] = smooth
    path = bflfiles.save(tmp_path / "pqs.safetensors", tensors, layers)
    got = load(tiny_models, path).pipe.transformer.state_dict()["single_transformer_blocks.0.attn.to_out.weight"]
    assert torch.equal(got, dense[f"{layer}.weight"] * smooth.reshape(1, -1))


def test_fp8_per_row_scales_are_accepted(tmp_path, tiny_models, state):
    tensors, layers, dense = bflfiles.bfl_tensors(state, "fp8")
    name = "double_blocks.0.img_mlp.0.weight"
    rows = torch.linspace(0.001, 0.01, dense[name].shape[0])
    tensors[name.replace(".weight", ".weight_scale")] = rows.reshape(-1, 1)
    path = bflfiles.save(tmp_path / "rows.safetensors", tensors, layers)
    got = load(tiny_models, path).pipe.transformer.state_dict()["transformer_blocks.0.ff.linear_in.weight"]
    assert torch.equal(got, tensors[name].float() * rows.reshape(-1, 1))


# -- loud errors -----------------------------------------------------------------------------

L = "double_blocks.0.img_attn.proj"


def _drop(key):
    return lambda t, layers: t.pop(key)


def _set(key, value):
    return lambda t, layers: t.__setitem__(key, value)


CORRUPTIONS = {
    "unknown format": (lambda t, layers: layers[L].update(format="int4_magic"), f"{L}.*'int4_magic'"),
    "missing block scale": (_drop(f"{L}.weight_scale"), f"{L}.*missing weight_scale"),
    "missing tensor scale": (_drop(f"{L}.weight_scale_2"), f"{L}.*missing weight_scale_2"),
    "truncated weight": (lambda t, layers: t.__setitem__(f"{L}.weight", t[f"{L}.weight"][:, :8].clone()),
                         f"{L}.*does not hold"),
    "too few block scales": (lambda t, layers: t.__setitem__(f"{L}.weight_scale", t[f"{L}.weight_scale"][:64].clone()),
                             f"{L}.*block scales"),
    "weight not packed": (_set(f"{L}.weight", torch.zeros(32, 32)), f"{L}.*uint8"),
    "orphan scale": (_set("img_in.weight_scale", torch.tensor(1.0)), "img_in.weight_scale.*no layer"),
    "scale the format has no use for": (_set(f"{L}.scale_input", torch.tensor(1.0)), f"{L}.scale_input"),
    "unknown tensor": (_set("double_blocks.0.extra.weight", torch.zeros(2, 2)), "unexpected.*extra"),
    "missing tensor": (_drop("final_layer.linear.weight"), "missing.*final_layer.linear"),
    "wrong shape": (_set("img_in.weight", torch.zeros(32, 64)), "img_in.weight.*needs \\(32, 128\\)"),
    "fp8 without a format": (_set("img_in.weight", torch.zeros(32, 128, dtype=torch.float8_e4m3fn)),
                             "img_in.weight.*float8_e4m3fn.*no\\s+comfy_quant"),
    "layer not in the model": (lambda t, layers: layers.update({"double_blocks.7.img_mlp.0": {"format": "nvfp4"}}),
                               "double_blocks.7.img_mlp.0.*not part"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_file_fails_loudly_naming_the_layer(tmp_path, tiny_models, state, case):
    corrupt, pattern = CORRUPTIONS[case]
    tensors, layers, _ = bflfiles.bfl_tensors(state, "nvfp4")
    corrupt(tensors, layers)
    path = bflfiles.save(tmp_path / "bad.safetensors", tensors, layers)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load(tiny_models, path)
    assert str(path) in str(info.value)


def test_files_that_are_not_checkpoints_fail_loudly(tmp_path, tiny_models, state):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(tiny_models, garbage)
    tensors, _, _ = bflfiles.bfl_tensors(state, "fp8")
    tensors[f"{L}.comfy_quant"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=f"{L}.comfy_quant.*not JSON"):
        load(tiny_models, bflfiles.save(tmp_path / "marker.safetensors", tensors, {}, markers="metadata"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items() if not k.endswith("comfy_quant")},
              str(tmp_path / "meta.safetensors"), metadata={"_quantization_metadata": json.dumps([1, 2])})
    with pytest.raises(CheckpointError, match="_quantization_metadata"):
        load(tiny_models, tmp_path / "meta.safetensors")


# -- a whole job, through the in-process executor -------------------------------------------


def test_a_job_renders_a_quantized_variant_like_its_dequantized_twin(tmp_path, tiny_models, state):
    from helpers import assert_done, row, write_manifest

    from klein_ray.config import JobConfig, RunConfig, VariantConfig
    from klein_ray.executors.inprocess import InProcessExecutor
    from klein_ray.scheduling.driver import EXIT_OK, Driver, RenderJob
    from klein_ray.storage import LocalStore

    # The twin: the tiny model directory with the file's dequantized weights in diffusers form.
    path = tmp_path / "klein-nvfp4.safetensors"
    expected = bflfiles.write(path, state, "nvfp4")
    twin = KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=1)
    twin.pipe.transformer.load_state_dict(expected, strict=True)
    twin.pipe.save_pretrained(tmp_path / "twin")

    variants = {"q": VariantConfig(source=str(tiny_models["tiny"]), transformer=str(path), pipeline="distilled"),
                "twin": VariantConfig(source=str(tmp_path / "twin"), pipeline="distilled")}
    config = JobConfig(default_variant="q", variants=variants, run=RunConfig(in_flight_per_actor=1))
    rows = [row(id=f"{v}{i}", prompt=f"a product shot {i}", variant=v, width=64, height=64, seed=i)
            for v in variants for i in range(2)]
    out = tmp_path / "out"
    summary, code = Driver(RenderJob(str(write_manifest(tmp_path / "m.parquet", rows)), str(out), config),
                           InProcessExecutor).run()
    assert code == EXIT_OK and summary["committed"] == 4
    store = LocalStore(out)
    for i in range(2):
        ours, theirs = assert_done(store, f"q{i}"), assert_done(store, f"twin{i}")
        images = [np.asarray(Image.open(out / m["image"]["key"])) for m in (ours, theirs)]
        assert np.array_equal(*images)


def test_a_corrupt_file_fails_its_variants_rows_naming_the_layer(tmp_path, tiny_models, state):
    import pyarrow.parquet as pq
    from helpers import row, write_manifest

    from klein_ray.config import JobConfig, RunConfig, VariantConfig
    from klein_ray.executors.inprocess import InProcessExecutor
    from klein_ray.scheduling.driver import EXIT_ROWS_FAILED, Driver, RenderJob

    tensors, layers, _ = bflfiles.bfl_tensors(state, "nvfp4")
    tensors.pop(f"{L}.weight_scale_2")
    path = bflfiles.save(tmp_path / "bad.safetensors", tensors, layers)
    variants = {"q": VariantConfig(source=str(tiny_models["tiny"]), transformer=str(path), pipeline="distilled")}
    config = JobConfig(default_variant="q", variants=variants, run=RunConfig(model_load_attempts=1))
    manifest = write_manifest(tmp_path / "m.parquet", [row(id="q0", prompt="a lamp", width=64, height=64)])
    summary, code = Driver(RenderJob(str(manifest), str(tmp_path / "out"), config), InProcessExecutor).run()
    assert code == EXIT_ROWS_FAILED and summary["failed"] == 1
    [error] = pq.read_table(tmp_path / "out" / "_job" / "errors.parquet").to_pylist()
    assert error["error_type"] == "ModelLoadError"
    assert "CheckpointError" in error["message"] and L in error["message"]

"""precision: fp8 on the tiny real model, through torch's CPU float8 GEMM (the same
``torch._scaled_mm`` code path a Hopper runs): the layers replaced, the arithmetic against the
dequantized weights, BFL's fp8 files kept code for code, what 'auto' chooses, and the refusal on
a GPU without FP8 tensor cores."""

from __future__ import annotations

import bflfiles
import numpy as np
import pytest
import torch
from torch import nn

from klein_ray.model import accel
from klein_ray.model.accel import GPUSettings
from klein_ray.model.fp8 import FP8, Fp8Linear, fp8_problem, quantize_weight
from klein_ray.model.pipeline import KleinModel, RenderRequest

REQUEST = RenderRequest(prompts=["a lamp", "a chair"], seeds=[1, 2], width=64, height=64, steps=2, guidance=1.0)


def load(tiny_models, precision="auto", dtype="auto", transformer_file=None) -> KleinModel:
    return KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=2, dtype=dtype,
                                      settings=GPUSettings(precision=precision),
                                      transformer_file=transformer_file and str(transformer_file))


def transformer_output(model: KleinModel) -> torch.Tensor:
    """The transformer's output for fixed random inputs (the tiny model's shapes)."""
    gen = torch.Generator().manual_seed(0)
    dtype = model.pipe.transformer.dtype
    x = torch.randn(2, 64, 128, generator=gen).to(dtype)
    ctx = torch.randn(2, 24, 96, generator=gen).to(dtype)
    ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(8), torch.arange(8), torch.arange(1),
                                     indexing="ij"), dim=-1).reshape(1, 64, 4).expand(2, -1, -1)
    with torch.inference_mode():
        return model.pipe.transformer(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.7, 0.7]),
                                      img_ids=ids, txt_ids=torch.zeros(2, 24, 4), return_dict=False)[0].float()


def fp8_layers(model: KleinModel) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.pipe.transformer.named_modules() if isinstance(m, Fp8Linear)}


def test_every_block_linear_becomes_fp8_and_nothing_outside_the_blocks(tiny_models):
    model = load(tiny_models, "fp8")
    layers = fp8_layers(model)
    plain = [n for n, m in model.pipe.transformer.named_modules() if isinstance(m, nn.Linear)]
    assert layers and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in layers)
    assert not [n for n in plain if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert "x_embedder" in plain and "proj_out" in plain  # the edges stay in the model's dtype
    assert all(m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32 for m in layers.values())
    assert model.settings["precision"] == "fp8"
    assert model.accel_report["fp8"]["layers"] == len(layers) and model.accel_report["fp8"]["kept_from_file"] == 0


def test_an_fp8_layer_computes_the_product_of_its_quantized_operands():
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * torch.linspace(0.01, 3, 48).reshape(-1, 1))
    x = torch.randn(5, 7, 64, generator=gen) * 4
    for rowwise in (True, False):
        layer = Fp8Linear.from_linear(linear, rowwise=rowwise)
        out = layer(x)
        # The same arithmetic by hand: activations scaled per token (or per call), cast to fp8.
        x2 = x.reshape(-1, 64)
        amax = x2.abs().amax(dim=1, keepdim=True) if rowwise else x2.abs().amax()
        scale = amax / 448
        xq = (x2 / scale).to(FP8).float() * scale
        expected = (xq @ layer.dequantized().t() + linear.bias).reshape(5, 7, 48)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        # And close to the full-precision layer: float8 keeps ~2 significant digits.
        rel = (out - linear(x)).norm() / linear(x).norm()
        assert 0 < rel < 0.06, rel


def test_quantizing_with_a_files_scale_gives_back_its_codes_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    codes = (torch.randn(32, 48, generator=gen) * 100).clamp(-448, 448).to(FP8)
    scale = 0.0123
    for dtype in (torch.float32, torch.bfloat16):  # bf16: what a GPU holds after dequantizing
        weight = (codes.float() * scale).to(dtype)
        again, row_scales = quantize_weight(weight, tensor_scale=scale)
        assert torch.equal(again.view(torch.uint8), codes.view(torch.uint8)), dtype
        assert torch.all(row_scales == torch.tensor(scale, dtype=torch.float32))


def test_fp8_renders_close_to_the_full_precision_model(tiny_models):
    full, fp8 = load(tiny_models), load(tiny_models, "fp8")
    ref, out = transformer_output(full), transformer_output(fp8)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel
    diffs = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
             for a, b in zip(full.render(REQUEST).images, fp8.render(REQUEST).images)]
    assert max(d.mean() for d in diffs) < 2.0  # of 255, on noise images


def test_a_bfl_fp8_file_is_kept_code_for_code_when_the_model_runs_in_fp8(tmp_path, tiny_models):
    state = {k: v.detach().clone() for k, v in load(tiny_models).pipe.transformer.state_dict().items()}
    path = tmp_path / "klein-fp8.safetensors"
    bflfiles.write(path, state, "fp8")
    tensors, _, _ = bflfiles.bfl_tensors(state, "fp8")
    for dtype in ("float32", "bfloat16"):
        model = load(tiny_models, "fp8", dtype=dtype, transformer_file=path)
        layers = fp8_layers(model)
        assert model.accel_report["fp8"]["kept_from_file"] == len(layers) > 0
        # A fused BFL QKV is split into diffusers' Q, K and V: each keeps its rows' codes.
        qkv = tensors["double_blocks.0.img_attn.qkv.weight"].view(torch.uint8)
        rows = qkv.shape[0] // 3
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            got = layers[f"transformer_blocks.0.attn.{part}"].weight.view(torch.uint8)
            assert torch.equal(got, qkv[i * rows:(i + 1) * rows]), (dtype, part)
        got = layers["single_transformer_blocks.1.attn.to_out"].weight.view(torch.uint8)
        assert torch.equal(got, tensors["single_blocks.1.linear2.weight"].view(torch.uint8))
        assert len(model.render(REQUEST).images) == 2


def test_auto_dequantizes_an_fp8_file_off_the_gpu(tmp_path, tiny_models):
    state = {k: v.detach().clone() for k, v in load(tiny_models).pipe.transformer.state_dict().items()}
    path = tmp_path / "klein-fp8.safetensors"
    bflfiles.write(path, state, "fp8")
    model = load(tiny_models, "auto", transformer_file=path)
    assert model.settings["precision"] == "dtype" and not fp8_layers(model)
    assert "fp8" not in model.accel_report


def test_auto_settings_by_device():
    cpu = accel.resolve(GPUSettings(), "cpu", file_fp8=True)
    assert cpu == {"compile": False, "channels_last": False, "cpu_offload": False, "precision": "dtype"}
    cuda = accel.resolve(GPUSettings(), "cuda", file_fp8=False)
    assert cuda == {"compile": True, "channels_last": True, "cpu_offload": False, "precision": "dtype"}
    off = accel.resolve(GPUSettings(compile=False, channels_last=False), "cuda", file_fp8=False)
    assert not off["compile"] and not off["channels_last"]
    assert accel.resolve(GPUSettings(compile=True, precision="fp8"), "cpu", False)["compile"] is True
    offload = accel.resolve(GPUSettings(cpu_offload=True), "cuda", file_fp8=False)
    assert offload["cpu_offload"] and not offload["compile"] and not offload["channels_last"]


def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    # No such GPU here: torch's answers about the device are set to an A100's.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A100-SXM4-80GB")
    problem = fp8_problem("cuda:0")
    assert "A100" in problem and "8.0" in problem and "8.9" in problem
    with pytest.raises(ValueError, match="no FP8 tensor cores"):
        accel.resolve(GPUSettings(precision="fp8"), "cuda:0", file_fp8=False)
    # 'auto' with an fp8 file quietly dequantizes instead.
    assert accel.resolve(GPUSettings(), "cuda:0", file_fp8=True)["precision"] == "dtype"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    assert fp8_problem("cuda:0") is None
    assert accel.resolve(GPUSettings(), "cuda:0", file_fp8=True)["precision"] == "fp8"


def test_a_job_with_an_fp8_variant_says_so_in_each_rows_metadata(tmp_path, tiny_models):
    from helpers import assert_done, row, write_manifest

    from klein_ray.config import JobConfig, VariantConfig
    from klein_ray.executors.inprocess import InProcessExecutor
    from klein_ray.scheduling.driver import EXIT_OK, Driver, RenderJob
    from klein_ray.storage import LocalStore

    variants = {v: VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled", precision=p)
                for v, p in (("full", "bf16"), ("fp8", "fp8"))}
    config = JobConfig(default_variant="full", variants=variants)
    manifest = write_manifest(tmp_path / "m.parquet", [
        row(id=f"{v}-{i}", prompt=f"a vase {i}", variant=v, width=64, height=64, seed=i)
        for v in variants for i in range(2)])
    summary, code = Driver(RenderJob(str(manifest), str(tmp_path / "out"), config), InProcessExecutor).run()
    assert code == EXIT_OK and summary["committed"] == 4
    store = LocalStore(tmp_path / "out")
    full, fp8 = assert_done(store, "full-0"), assert_done(store, "fp8-0")
    assert full["model"]["settings"]["precision"] == "dtype" and fp8["model"]["settings"]["precision"] == "fp8"
    # Same prompt and seed, other arithmetic: close pixels, not the same file.
    assert full["image"]["sha256"] != fp8["image"]["sha256"]

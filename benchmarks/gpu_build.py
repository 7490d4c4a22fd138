"""The models ``benchmarks/gpu.py`` measures, built in memory, and the timing helpers its rows share.

Full-size FLUX.2 klein 4B / 9B architectures with RANDOM weights (nothing is downloaded; their
images are noise and say nothing about quality, only about speed), or the same structure at a
``tiny`` scale that runs on a CPU in seconds (``--dry-run``). See gpu.py's docstring for the
architectures. Also here: the dry run's two checks (``from_pipe`` renders like
``from_pretrained``; the full-size configs have the published parameter counts).
"""

from __future__ import annotations

import gc
import tempfile
import time

REAL_VOCAB = 151936

TEXT = {
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
    "9b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=12288, tie_word_embeddings=False),
}
TRANSFORMER = {
    "4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
               joint_attention_dim=7680),
    "9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128,
               joint_attention_dim=12288),
}
# Published sizes the meta-device check compares against (billions of parameters, +-5%).
EXPECTED_PARAMS = {"4b": {"transformer": 3.88, "text_encoder": 4.02},
                   "9b": {"transformer": 9.08, "text_encoder": 8.19}}
PROMPT = ("studio photo of a {} on a white background, soft shadow, catalog style, "
          "high detail, 50mm lens, variation {}")
ITEMS = ["red leather sneaker", "black ceramic mug", "navy wool peacoat", "gold wristwatch",
         "sage green towel set", "oak side table", "denim jacket", "steel water bottle"]


def component_configs(variant: str, scale: str, vocab: int) -> dict:
    """Keyword arguments for the text encoder, transformer and VAE of one variant at one scale."""
    if scale == "full":
        text = dict(TEXT[variant], vocab_size=max(vocab, REAL_VOCAB), max_position_embeddings=40960,
                    rope_theta=1_000_000, rms_norm_eps=1e-6)
        transformer = dict(TRANSFORMER[variant], patch_size=1, in_channels=128, mlp_ratio=3.0,
                           timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                           rope_theta=2000, guidance_embeds=False)
        return {"text": text, "transformer": transformer, "vae": {}}
    # tiny: the same structure (36 text layers so out-layers 9/18/27 exist, FLUX.2's 128 latent
    # channels and 4-axis rope), widths cut down so it runs on a CPU in seconds; 9B a bit wider.
    wide = 2 if variant == "9b" else 1
    hidden = 32 * wide
    text = dict(vocab_size=((vocab + 63) // 64) * 64, hidden_size=hidden, num_hidden_layers=36,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                intermediate_size=2 * hidden, max_position_embeddings=1024,
                tie_word_embeddings=variant == "4b")
    transformer = dict(num_layers=wide, num_single_layers=2 * wide, num_attention_heads=2,
                       attention_head_dim=16, joint_attention_dim=3 * hidden, patch_size=1,
                       in_channels=128, mlp_ratio=3.0, timestep_guidance_channels=32,
                       axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False)
    vae = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32,
               norm_num_groups=4, sample_size=64, patch_size=(2, 2))
    return {"text": text, "transformer": transformer, "vae": vae}


def build_pipeline(variant: str, scale: str, device: str, dtype, tokenizer, seed: int = 0):
    """A Flux2KleinPipeline with random weights, built straight on ``device`` in ``dtype``."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = component_configs(variant, scale, len(tokenizer))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate (and randomly initialise) in the target dtype
    try:
        with torch.device(device):
            text_encoder = Qwen3ForCausalLM(Qwen3Config(pad_token_id=tokenizer.pad_token_id,
                                                        **cfg["text"])).eval()
            transformer = Flux2Transformer2DModel(**cfg["transformer"]).eval()
            vae = AutoencoderKLFlux2(**cfg["vae"]).eval()
    finally:
        torch.set_default_dtype(previous)
    if device == "meta":
        return text_encoder, transformer, vae
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- timing -------------------------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` untimed ones. ``fn(i)`` gets the call index."""
    for i in range(warmup):
        fn(-1 - i)
    sync(device)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def prompts_for(call: int, batch: int, tag: str) -> list[str]:
    return [PROMPT.format(ITEMS[(call * batch + j) % len(ITEMS)], f"{tag}-{call}-{j}") for j in range(batch)]


def free(device: str) -> None:
    """Give back what the last row's models held (their Python objects must be gone already)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# -- dry-run checks ---------------------------------------------------------------------------

def check_from_pipe(tokenizer) -> None:
    """KleinModel.from_pipe behaves as KleinModel.from_pretrained of the same pipeline (tiny, CPU, fp32)."""
    import numpy as np
    import torch

    from klein_ray.model.pipeline import KleinModel, RenderRequest

    pipe = build_pipeline("4b", "tiny", "cpu", torch.float32, tokenizer, seed=1)
    with tempfile.TemporaryDirectory(prefix="klein-ray-gpu-dry-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        loaded = KleinModel.from_pretrained(tmp)
        wrapped = KleinModel.from_pipe(pipe)
        req = RenderRequest(prompts=prompts_for(0, 2, "wrap"), seeds=[1, 2], width=64, height=64,
                            steps=2, guidance=1.0)
        a, b = loaded.render(req), wrapped.render(req)
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
        if not same or loaded.info.distilled != wrapped.info.distilled:
            raise SystemExit("KleinModel.from_pipe renders differently from KleinModel.from_pretrained")
    print("dry-run: KleinModel.from_pipe renders bitwise like KleinModel.from_pretrained", flush=True)


def check_full_configs(tokenizer) -> None:
    """Build the full-size 4B and 9B on the meta device (no memory): configs valid, sizes right."""
    import torch

    for variant in ("4b", "9b"):
        text_encoder, transformer, vae = build_pipeline(variant, "full", "meta", torch.bfloat16, tokenizer)
        counts = {"transformer": sum(p.numel() for p in transformer.parameters()) / 1e9,
                  "text_encoder": sum(p.numel() for p in text_encoder.parameters()) / 1e9}
        vae_m = sum(p.numel() for p in vae.parameters()) / 1e6
        for name, got in counts.items():
            want = EXPECTED_PARAMS[variant][name]
            if abs(got - want) / want > 0.05:
                raise SystemExit(f"{variant} {name}: {got:.2f}B parameters, expected ~{want}B")
        bf16_gb = (counts["transformer"] + counts["text_encoder"]) * 2 + vae_m * 2 / 1000
        print(f"dry-run: full {variant} on meta: transformer {counts['transformer']:.2f}B, text encoder "
              f"{counts['text_encoder']:.2f}B, VAE {vae_m:.0f}M parameters (~{bf16_gb:.0f} GB of bf16 weights)",
              flush=True)

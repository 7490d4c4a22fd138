#!/usr/bin/env python
"""GPU benchmark: seconds per image of full-size FLUX.2 klein 4B / 9B architectures (random weights),
diffusers as it is vs klein-ray's model layer, and the text encoder alone.

    .venv/bin/python benchmarks/gpu.py [--variants 4b,9b] [--sizes 1024,512] [--batches 1,4] [--reps 3]
                                       [--ours-settings compile,channels_last] [--kv-refs 3] [--json FILE]
    .venv/bin/python benchmarks/gpu.py --dry-run [--scale tiny]      # no GPU: CPU-side code path

Needs a CUDA GPU (an H100 runs the defaults in a few minutes). Without one it prints
"needs a CUDA GPU; see benchmarks/README.md" and exits with code 2 (nothing measured), unless
``--dry-run`` is given.

The models are built in memory with the published architectures and RANDOM weights (nothing is
downloaded; their images are noise and say nothing about quality, only about speed):

  4B: transformer 5 double + 20 single blocks, 24 heads x 128, joint_attention_dim 7680;
      text encoder shaped like Qwen3-4B (hidden 2560, 36 layers, 32 heads, 8 kv heads,
      head_dim 128, intermediate 9728, vocab 151936, tied embeddings);
  9B: transformer 8 + 24 blocks, 32 heads x 128, joint_attention_dim 12288;
      text encoder shaped like Qwen3-8B (hidden 4096, 36 layers, 32 heads, 8 kv heads,
      head_dim 128, intermediate 12288, vocab 151936, untied);
  VAE: AutoencoderKLFlux2's default config; scheduler: shift 3.0, dynamic shifting;
  tokenizer: the tiny model's offline BPE (``klein_ray.model.tiny._train_tokenizer``), ~400
  tokens; the encoder keeps the real 151,936-row vocabulary (the extra rows are padding) so the
  logits head diffusers computes costs what it costs on the real model. Prompts are padded to
  512 tokens either way, so the sequence length is the real one.

Per variant, in bf16 on cuda, 4 steps, for each size and batch (one warm-up call, then ``--reps``
timed calls, ``torch.cuda.synchronize`` around each; PIL images out, as both return):

  (a) diffusers: ``pipe(prompt=[...], generator=[one per image], num_inference_steps=4,
      guidance_scale=1.0, height, width)``;
  (b) ours: ``klein_ray.model.pipeline.KleinModel.render(RenderRequest(...))`` on the very same
      pipeline object (trimmed text encoder; prompts new to the cache, i.e. the encoder runs);
  (b+) ours with every prompt already cached (what a catalog with repeating prompts sees);
  (c) the text encoder alone, batch 1 and 4: ``pipe.encode_prompt`` vs ``PromptEncoder.encode``
      with the cache off, and the largest difference between their embeddings.

They run in the order (c), (a), then (b) and (b+): wrapping applies ``KleinModel``'s GPU settings
(``--ours-settings compile,channels_last``; none by default), which change the pipeline in place.

  (d) the KV row (``gpu_kv.py``), on a fresh 9B: a ``--kv-refs``-reference edit (default 3
      references; 0 skips it) at the first size, references of that size too, batch 1, through
      ``KleinModel.render`` on ``Flux2KleinPipeline`` and then on ``Flux2KleinKVPipeline`` over the
      same components, after checking the KV render extracted the references' K/V at step 0 and
      reused it at steps 1-3. No ``--ours-settings`` there.

Rather than writing 16-34 GB to disk, the benchmark wraps the in-memory pipeline with
``KleinModel.from_pipe``. ``--dry-run`` checks that against ``KleinModel.from_pretrained`` of the
same pipeline saved to disk (bitwise-equal images) at the tiny scale, builds the full-size 4B and 9B on the ``meta`` device to check the configs
(parameter counts), then runs the whole benchmark loop on CPU at ``--scale tiny``, the KV row included.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NO_GPU_MESSAGE = "needs a CUDA GPU; see benchmarks/README.md"
EXIT_NO_GPU = 2
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
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
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

def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``reps`` calls after ``warmup`` untimed ones. ``fn(i)`` gets the call index."""
    for i in range(warmup):
        fn(-1 - i)
    _sync(device)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def prompts_for(call: int, batch: int, tag: str) -> list[str]:
    return [PROMPT.format(ITEMS[(call * batch + j) % len(ITEMS)], f"{tag}-{call}-{j}") for j in range(batch)]


def bench_variant(variant: str, scale: str, device: str, dtype, tokenizer, sizes, batches, reps,
                  settings: dict | None = None) -> dict:
    import torch

    from klein_ray.model.pipeline import GPUSettings, KleinModel, RenderRequest
    from klein_ray.model.text import PromptEncoder

    t0 = time.perf_counter()
    pipe = build_pipeline(variant, scale, device, dtype, tokenizer)
    _sync(device)
    build_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = {"variant": variant, "scale": scale, "build_s": build_s, "render": [], "text": []}
    print(f"## {variant} ({scale}) built in {build_s:.1f} s on {device}", flush=True)
    points = [(size, batch) for size in sizes for batch in batches]

    def diffusers_call(i, size, batch):
        pipe(prompt=prompts_for(i, batch, f"a{variant}-{size}-{batch}"), height=size, width=size,
             num_inference_steps=4, guidance_scale=1.0,
             generator=[torch.Generator("cpu").manual_seed(1000 * i + j) for j in range(batch)])

    # (c) and (a) first: wrapping may change the pipeline in place (compile, channels-last).
    uncached = PromptEncoder(pipe.text_encoder, pipe.tokenizer, cache_size=0)
    for batch in batches:
        with torch.inference_mode():
            a = timed(lambda i: pipe.encode_prompt(prompts_for(i, batch, "te"), device=device,
                                                   max_sequence_length=512), device, reps)
            b = timed(lambda i: uncached.encode(prompts_for(i, batch, "te"), 512), device, reps)
            ref, _ = pipe.encode_prompt(prompts_for(0, batch, "eq"), device=device, max_sequence_length=512)
            mine, _ = uncached.encode(prompts_for(0, batch, "eq"), 512)
            diff = (ref.float() - mine.float()).abs().max().item()
        out["text"].append({"batch": batch, "encode_prompt_s": a, "prompt_encoder_s": b, "max_abs_diff": diff})
        print(f"  text encoder batch {batch}: diffusers encode_prompt {a:.4f} s, PromptEncoder {b:.4f} s "
              f"({b / a:.2f}x); max |diff| {diff:.3g}", flush=True)
    diffusers_s = {}
    for size, batch in points:
        diffusers_s[(size, batch)] = timed(lambda i: diffusers_call(i, size, batch), device, reps)
        print(f"  {size}x{size} batch {batch}: diffusers {diffusers_s[(size, batch)] / batch:.3f} s/img", flush=True)

    model = KleinModel.from_pipe(pipe, settings=GPUSettings(**(settings or {})))
    out["settings"] = getattr(model, "settings", None)
    if settings:
        print(f"  ours with settings {out['settings']}", flush=True)

    def ours_call(i, size, batch, cached=False):
        tag = ("c" if cached else "b") + f"{variant}-{size}-{batch}"
        model.render(RenderRequest(prompts=prompts_for(0 if cached else i, batch, tag),
                                   seeds=[1000 * i + j for j in range(batch)],
                                   width=size, height=size, steps=4, guidance=1.0))

    for size, batch in points:
        a = diffusers_s[(size, batch)]
        b = timed(lambda i: ours_call(i, size, batch), device, reps)
        c = timed(lambda i: ours_call(i, size, batch, cached=True), device, reps)  # warm-up fills the cache
        out["render"].append({"size": size, "batch": batch, "diffusers_s_per_image": a / batch,
                              "ours_s_per_image": b / batch, "ours_cached_s_per_image": c / batch})
        print(f"  {size}x{size} batch {batch}: ours {b / batch:.3f} s/img ({b / a:.2f}x diffusers), "
              f"ours prompt cached {c / batch:.3f} s/img ({c / a:.2f}x)", flush=True)
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"  peak GPU memory allocated: {out['peak_gpu_gib']:.1f} GiB", flush=True)
    del model, pipe, uncached
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def bench_kv_row(scale: str, device: str, dtype, tokenizer, size: int, n_refs: int, reps: int) -> dict:
    """(d): the 9B, built afresh (the variants' pipelines are gone), through gpu_kv.bench_kv."""
    import torch
    from gpu_kv import bench_kv  # beside this script

    print(f"## 9b ({scale}): {n_refs}-reference edit, without and with the KV cache", flush=True)
    pipe = build_pipeline("9b", scale, device, dtype, tokenizer)
    out = bench_kv(pipe, device, size, n_refs, reps, timed)
    del pipe
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# -- dry-run checks -----------------------------------------------------------------------------

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


def print_tables(results: list[dict], kv: dict | None) -> None:
    """The figures as Markdown tables: renders, text encoder, and the KV row when it ran."""
    print()
    print("| variant | size | batch | diffusers s/img | ours s/img | ours/diffusers | ours cached s/img | cached/diffusers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["render"]:
            a, b, c = row["diffusers_s_per_image"], row["ours_s_per_image"], row["ours_cached_s_per_image"]
            print(f"| {r['variant']} | {row['size']} | {row['batch']} | {a:.3f} | {b:.3f} | {b / a:.2f} | {c:.3f} | {c / a:.2f} |")
    print()
    print("| variant | batch | encode_prompt s | PromptEncoder s | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["text"]:
            print(f"| {r['variant']} | {row['batch']} | {row['encode_prompt_s']:.4f} | {row['prompt_encoder_s']:.4f} | "
                  f"{row['prompt_encoder_s'] / row['encode_prompt_s']:.2f} | {row['max_abs_diff']:.3g} |")
    if kv:
        print()
        print("| variant | size | references | without KV s/img | with KV s/img | KV/without |")
        print("|---|---:|---:|---:|---:|---:|")
        a, b = kv["without_kv_s_per_image"], kv["with_kv_s_per_image"]
        print(f"| 9b | {kv['size']} | {kv['references']} | {a:.3f} | {b:.3f} | {b / a:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="4b,9b")
    p.add_argument("--sizes", help="output sides (default 1024,512; dry-run 128,64)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--reps", type=int, help="timed calls per point, median kept (default 3; dry-run 1)")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: CPU checks at --scale")
    p.add_argument("--scale", choices=["full", "tiny"], help="model size (default full; dry-run tiny)")
    p.add_argument("--ours-settings", default="",
                   help="GPUSettings for ours, comma-separated: compile,channels_last (default none)")
    p.add_argument("--kv-refs", type=int, default=3,
                   help="references in the 9B KV-vs-plain edit row (default 3; 0 skips the row)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return EXIT_NO_GPU
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")  # random weights
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from klein_ray.model.tiny import _train_tokenizer

    device = "cuda" if cuda and not args.dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scale = args.scale or ("tiny" if args.dry_run else "full")
    sizes = [int(s) for s in (args.sizes or ("128,64" if args.dry_run else "1024,512")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    reps = args.reps or (1 if args.dry_run else 3)
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"# gpu benchmark: {platform.node()}, GPU {gpu}, torch {torch.__version__}, "
          f"{datetime.date.today()}; RANDOM weights (images are noise); device {device} {dtype}, "
          f"scale {scale}{', DRY RUN' if args.dry_run else ''}", flush=True)
    tokenizer = _train_tokenizer()
    if args.dry_run:
        check_from_pipe(tokenizer)
        check_full_configs(tokenizer)
    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        settings = {name.strip(): True for name in args.ours_settings.split(",") if name.strip()}
        results.append(bench_variant(variant, scale, device, dtype, tokenizer, sizes, batches, reps, settings))
    kv = bench_kv_row(scale, device, dtype, tokenizer, sizes[0], args.kv_refs, reps) if args.kv_refs else None

    print_tables(results, kv)
    if args.dry_run:
        print("\nDRY RUN on CPU at a reduced scale: the figures above check the code path, they are "
              "not GPU measurements.")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "gpu": gpu, "scale": scale,
                                               "dry_run": args.dry_run, "results": results, "kv": kv},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Row (f) of ``benchmarks/gpu.py``: ``precision: fp8`` against bf16, speed and fidelity.

A second pipeline is built with the same seed, so with the same random weights as the bf16 one
(checked: embedder and block weights compared before quantizing; where the seed did not
reproduce them, the bf16 pipeline's weights are copied into it), and wrapped with
``GPUSettings(precision="fp8")`` plus the bf16 row's own compile / channels-last settings (the
defaults: compiled on CUDA), then warmed up with the same plan. Both models stay in memory:
a 4B bf16 and its fp8 copy fit an 80 GB card together; a 9B pair may not (``--fp8-variants``).

- Speed: seconds per image of ``KleinModel.render`` for each, timed back to back (prompts new
  to the cache), and through the worker (row (e)) when that row runs.
- Fidelity, the same inputs through both:
  (1) the transformer: the inputs of every transformer call of one bf16 render (hidden states,
      text embeddings, timestep, image and text ids, as the pipeline passes them at this size
      and batch) are replayed through both transformers; ``||fp8 - bf16|| / ||bf16||`` per step;
  (2) the images: the same prompts and seeds rendered by both; mean and largest absolute
      difference per pixel channel (0-255) and the share of values differing by more than 8.
  With random weights the images are noise: these say how far fp8 arithmetic moves a render of
  these weights, not how a real image looks.
"""

from __future__ import annotations

import time

from gpu_build import prompts_for, sync, timed  # beside this script

STEPS = 4
PIXEL_THRESHOLD = 8


def same_weights(a, b) -> bool:
    """Whether two freshly built transformers hold the same random weights (sampled tensors)."""
    import torch

    pairs = [(a.x_embedder.weight, b.x_embedder.weight),
             (a.transformer_blocks[0].attn.to_q.weight, b.transformer_blocks[0].attn.to_q.weight),
             (a.single_transformer_blocks[-1].attn.to_out.weight, b.single_transformer_blocks[-1].attn.to_out.weight)]
    return all(torch.equal(x, y) for x, y in pairs)


def capture_calls(model, request) -> list[dict]:
    """The keyword arguments of every transformer call of one render (tensors copied)."""
    import torch

    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = model.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.render(request)
    finally:
        handle.remove()
    return calls


def transformer_error(bf16, fp8, request) -> dict:
    """(1): relative error of the fp8 transformer's output per denoising step."""
    import torch

    errors, nonfinite = [], 0
    with torch.inference_mode():
        for kwargs in capture_calls(bf16, request):
            a = bf16.pipe.transformer(**kwargs)[0].float()
            b = fp8.pipe.transformer(**kwargs)[0].float()
            nonfinite += int((~torch.isfinite(a)).sum() + (~torch.isfinite(b)).sum())
            errors.append(((b - a).norm() / a.norm()).item())
    return {"relative_error_per_step": errors, "relative_error_mean": sum(errors) / len(errors),
            "relative_error_max": max(errors), "nonfinite_values": nonfinite}


def pixel_difference(bf16, fp8, request) -> dict:
    """(2): the same prompts and seeds rendered by both, compared value by value (0-255)."""
    import numpy as np

    a = np.stack([np.asarray(im, dtype=np.int16) for im in bf16.render(request).images])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in fp8.render(request).images])
    diff = np.abs(a - b)
    return {"pixel_mean_abs_diff": float(diff.mean()), "pixel_max_abs_diff": int(diff.max()),
            f"pixel_share_over_{PIXEL_THRESHOLD}": float((diff > PIXEL_THRESHOLD).mean())}


def fp8_model(bf16, build, device: str, plan: list):
    """The fp8 model: a fresh pipeline with the bf16 one's weights, quantized, compiled as the
    bf16 one is, warmed up with ``plan``. Returns it and what its making reported."""
    import torch

    from klein_ray.model import accel
    from klein_ray.model.pipeline import KleinModel

    t0 = time.perf_counter()
    pipe = build()
    seeded = same_weights(bf16.pipe.transformer, pipe.transformer)
    if not seeded:  # the seed did not reproduce them on this device: copy them (same names, same shapes)
        for name in ("text_encoder", "transformer", "vae"):
            getattr(pipe, name).load_state_dict(getattr(bf16.pipe, name).state_dict())
    wanted = {"compile": bf16.settings["compile"], "channels_last": bf16.settings["channels_last"]}
    fp8 = KleinModel.from_pipe(pipe, settings=accel.GPUSettings(precision="fp8", **wanted))
    sync(device)
    build_s = time.perf_counter() - t0
    # Two models' blocks share the blocks' code objects in this process (a worker holds one):
    # room for both sets of graphs under dynamo's per-function recompile limit.
    torch._dynamo.config.recompile_limit = 2 * accel.RECOMPILE_LIMIT
    warm = fp8.warm_up(plan)
    report = fp8.accel_report.get("fp8", {})
    print(f"  (f) fp8: built ({'same seed, same weights' if seeded else 'weights copied from bf16'}) and "
          f"quantized in {build_s:.1f} s ({report.get('layers')} layers, {report.get('parameters', 0) / 1e9:.2f}B "
          f"parameters, per-row scales {report.get('rowwise')}); settings {fp8.settings}; warm-up "
          f"{warm['calls']} call(s) {warm['seconds']:.1f} s, {warm['compiled']} graph(s) compiled", flush=True)
    return fp8, {"build_s": build_s, "same_seed_same_weights": seeded, "fp8_report": report,
                 "settings": fp8.settings, "warmup": warm}


def bench_fp8(bf16, build, *, variant: str, size: int, batch: int, reps: int, device: str, plan: list,
              worker=None) -> dict:
    """Row (f). ``bf16``: the bf16 model (warmed up); ``build()``: a fresh pipeline, same seed;
    ``worker(model, label, warmup)``: row (e) for a model, or None to skip it."""
    import torch

    from klein_ray.model.pipeline import RenderRequest

    fp8, made = fp8_model(bf16, build, device, plan)

    def request(i: int, tag: str) -> RenderRequest:
        return RenderRequest(prompts=prompts_for(i, batch, tag), seeds=[1000 * i + j for j in range(batch)],
                             width=size, height=size, steps=STEPS, guidance=1.0)

    # Speed, back to back (prompts new to the cache); then fidelity on the same inputs.
    bf16_s = timed(lambda i: bf16.render(request(i, f"f16-{variant}")), device, reps) / batch
    fp8_s = timed(lambda i: fp8.render(request(i, f"f8-{variant}")), device, reps) / batch
    row = dict(made, variant=variant, size=size, batch=batch, bf16_s_per_image=bf16_s, fp8_s_per_image=fp8_s,
               fp8_over_bf16=fp8_s / bf16_s)
    row.update(transformer_error(bf16, fp8, request(0, "fid")))
    row.update(pixel_difference(bf16, fp8, request(1, "fid")))
    if device.startswith("cuda"):
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    share = row[f"pixel_share_over_{PIXEL_THRESHOLD}"]
    print(f"  (f) fp8 {variant} {size}x{size} batch {batch}: bf16 {bf16_s:.3f} s/img, fp8 {fp8_s:.3f} s/img "
          f"({fp8_s / bf16_s:.2f}x); transformer ||fp8-bf16||/||bf16|| per step "
          f"{', '.join(f'{e:.4f}' for e in row['relative_error_per_step'])} (non-finite values "
          f"{row['nonfinite_values']}); pixels: mean |diff| {row['pixel_mean_abs_diff']:.2f}, max "
          f"{row['pixel_max_abs_diff']}, share > {PIXEL_THRESHOLD}: {share:.4f} (RANDOM weights: the images "
          "are noise)" + (f"; peak GPU memory, bf16 and fp8 models: {row['peak_gpu_gib']:.1f} GiB"
                          if "peak_gpu_gib" in row else ""), flush=True)
    if worker is not None:
        row["worker"] = worker(fp8, "fp8", made["warmup"])
    return row


def table(rows: list[tuple[dict, float | None]]) -> None:
    """(row, diffusers s/img or None) as a Markdown table."""
    share = f"pixel_share_over_{PIXEL_THRESHOLD}"
    print(f"\n| variant | size | batch | bf16 s/img | fp8 s/img | fp8/bf16 | fp8/diffusers | fp8 warm-up s "
          f"| transformer rel. error (mean / max of {STEPS} steps) | pixel mean abs diff | pixel max abs diff "
          f"| share > {PIXEL_THRESHOLD} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, diffusers in rows:
        vs = f"{r['fp8_s_per_image'] / diffusers:.2f}" if diffusers else "-"
        print(f"| {r['variant']} | {r['size']} | {r['batch']} | {r['bf16_s_per_image']:.3f} | "
              f"{r['fp8_s_per_image']:.3f} | {r['fp8_over_bf16']:.2f} | {vs} | {r['warmup']['seconds']:.1f} | "
              f"{r['relative_error_mean']:.4f} / {r['relative_error_max']:.4f} | {r['pixel_mean_abs_diff']:.2f} | "
              f"{r['pixel_max_abs_diff']} | {r[share]:.4f} |")
    print("\nfp8 fidelity is measured on RANDOM weights: the images are noise; the differences say how far "
          "fp8 arithmetic moves a render of these weights, not how real images look.")


"""Rows (a), (b0), (b), (b+) and (c) of ``benchmarks/gpu.py``, and its Markdown tables.

Each row takes gpu.py's ``Bench`` (device, sizes, batches, reps, rows asked for) and returns
its figures; seconds per image are medians of ``--reps`` calls after one untimed call
(``gpu_build.timed``). What each row measures: gpu.py's docstring.
"""

from __future__ import annotations

from gpu_build import prompts_for, timed  # beside this script


def settings_text(applied: dict) -> str:
    on = [k for k in ("compile", "channels_last") if applied.get(k)]
    return "+".join(on + (["fp8"] if applied.get("precision") == "fp8" else [])) or "eager"


def bench_text(pipe, b) -> list[dict]:
    """(c): diffusers' encode_prompt against PromptEncoder (cache off), per batch."""
    import torch

    from klein_ray.model.text import PromptEncoder

    uncached, rows = PromptEncoder(pipe.text_encoder, pipe.tokenizer, cache_size=0), []
    for batch in b.batches:
        with torch.inference_mode():
            a = timed(lambda i, n=batch: pipe.encode_prompt(prompts_for(i, n, "te"), device=b.device,
                                                            max_sequence_length=512), b.device, b.reps)
            o = timed(lambda i, n=batch: uncached.encode(prompts_for(i, n, "te"), 512), b.device, b.reps)
            ref, _ = pipe.encode_prompt(prompts_for(0, batch, "eq"), device=b.device, max_sequence_length=512)
            mine, _ = uncached.encode(prompts_for(0, batch, "eq"), 512)
            diff = (ref.float() - mine.float()).abs().max().item()
        rows.append({"batch": batch, "encode_prompt_s": a, "prompt_encoder_s": o, "max_abs_diff": diff})
        print(f"  (c) text encoder batch {batch}: diffusers encode_prompt {a:.4f} s, PromptEncoder {o:.4f} s "
              f"({o / a:.2f}x); max |diff| {diff:.3g}", flush=True)
    return rows


def time_diffusers(pipe, b, variant: str, size: int, batch: int) -> float:
    """(a): seconds per image of diffusers' own call."""
    import torch

    def call(i):
        pipe(prompt=prompts_for(i, batch, f"a{variant}-{size}-{batch}"), height=size, width=size,
             num_inference_steps=4, guidance_scale=1.0,
             generator=[torch.Generator("cpu").manual_seed(1000 * i + j) for j in range(batch)])

    seconds = timed(call, b.device, b.reps) / batch
    print(f"  (a) {size}x{size} batch {batch}: diffusers pipe() {seconds:.3f} s/img", flush=True)
    return seconds


def time_ours(model, b, tag: str, size: int, batch: int, cached: bool = False) -> float:
    """(b0), (b), (b+): seconds per image of ``model.render``; ``cached``: one prompt set, reused."""
    from klein_ray.model.pipeline import RenderRequest

    def call(i):
        model.render(RenderRequest(prompts=prompts_for(0 if cached else i, batch, f"{tag}-{size}-{batch}"),
                                   seeds=[1000 * i + j for j in range(batch)],
                                   width=size, height=size, steps=4, guidance=1.0))

    return timed(call, b.device, b.reps) / batch  # with cached, the untimed call fills the cache


def bench_ours(model, b, variant: str, diffusers: dict, eager: dict) -> list[dict]:
    """(b) and (b+) at every point, beside (a) and (b0)."""
    rows = []
    for size, batch in b.points:
        a, e = diffusers[(size, batch)], eager.get((size, batch))
        ours = time_ours(model, b, f"b{variant}", size, batch)
        cached = time_ours(model, b, f"c{variant}", size, batch, cached=True) if "cached" in b.rows else None
        rows.append({"size": size, "batch": batch, "diffusers_s_per_image": a, "ours_eager_s_per_image": e,
                     "ours_s_per_image": ours, "ours_cached_s_per_image": cached})
        print(f"  (b) {size}x{size} batch {batch}: ours {ours:.3f} s/img ({ours / a:.2f}x diffusers)"
              + (f", ours eager {e:.3f} ({e / a:.2f}x)" if e else "")
              + (f", ours prompt cached {cached:.3f} ({cached / a:.2f}x)" if cached else ""), flush=True)
    return rows


def print_tables(results: list[dict], kv: dict | None) -> None:
    """The figures as Markdown tables: renders, warm-ups, text encoder, worker, fp8, KV."""
    import gpu_fp8
    import gpu_kv

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    print("\n| variant | size | batch | diffusers s/img | ours eager s/img | ours s/img | ours/diffusers "
          "| ours cached s/img | cached/diffusers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for row in r["render"]:
            a, c = row["diffusers_s_per_image"], row["ours_cached_s_per_image"]
            print(f"| {r['variant']} | {row['size']} | {row['batch']} | {a:.3f} | {fmt(row['ours_eager_s_per_image'])} "
                  f"| {row['ours_s_per_image']:.3f} | {row['ours_s_per_image'] / a:.2f} | {fmt(c)} "
                  f"| {fmt(c and c / a, '.2f')} |")
    print("\n| variant | ours | warm-up calls | warm-up s | graphs traced | compiled anew | compiles after warm-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        w = r["warmup"]
        print(f"| {r['variant']} | {settings_text(r['settings'])} | {w['calls']} | {w['seconds']:.1f} | {w['graphs']} "
              f"| {w['compiled']} | {r['graphs_compiled_after_warmup']} |")
        if "warmup" in r.get("fp8", {}):
            w = r["fp8"]["warmup"]
            print(f"| {r['variant']} | {settings_text(r['fp8']['settings'])} | {w['calls']} | {w['seconds']:.1f} "
                  f"| {w['graphs']} | {w['compiled']} | - |")
    if any(r["text"] for r in results):
        print("\n| variant | batch | encode_prompt s | PromptEncoder s | ratio | max abs diff |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results:
            for row in r["text"]:
                print(f"| {r['variant']} | {row['batch']} | {row['encode_prompt_s']:.4f} | "
                      f"{row['prompt_encoder_s']:.4f} | {row['prompt_encoder_s'] / row['encode_prompt_s']:.2f} | "
                      f"{row['max_abs_diff']:.3g} |")
    workers = [(r["variant"], w, w["diffusers_s_per_image"]) for r in results
               for w in [r.get("worker"), r.get("fp8", {}).get("worker")] if w and "error" not in w]
    if workers:
        import gpu_worker  # only here: it imports the worker's stack (pydantic among others)

        gpu_worker.table(workers)
    fp8 = [(r["fp8"], r["fp8"]["diffusers_s_per_image"]) for r in results if "fp8_s_per_image" in r.get("fp8", {})]
    if fp8:
        gpu_fp8.table(fp8)
    if kv and "error" not in kv:
        gpu_kv.table(kv)

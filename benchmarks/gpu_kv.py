"""The KV row of ``benchmarks/gpu.py``: a multi-reference edit with and without the reference K/V
cache, both through klein-ray's model layer (``KleinModel.render``).

"Without" is ``Flux2KleinPipeline``; "with" is ``Flux2KleinKVPipeline`` over the very same
components (one set of random weights, so the cache is the only difference: step 0 runs the
reference tokens and keeps their K/V, steps 1-3 run the image tokens alone). BFL's 9B-KV is a
separate checkpoint whose weights were trained for this attention pattern; its speed is this
architecture's speed, its images are not these. Before timing, one KV render is watched to
check it really extracted and reused the cache, so a figure can never come from the plain path.
Both run with the ``settings`` given: gpu.py passes eager ones (no compile, as this row has
always been measured; compiling both pipelines of a 9B would add minutes of warm-up).
"""

from __future__ import annotations

PROMPT = "put the jacket from image 1 on the model in image 2, in the room of image 3; catalog photo"
STEPS = 4


def bench_kv(pipe, device: str, size: int, n_refs: int, reps: int, timed, settings=None) -> dict:
    """Seconds per image of one ``size``² edit with ``n_refs`` references of ``size``², batch 1,
    prompt cached (both sides encode it once, in the warm-up). ``timed(fn, device, reps)`` is
    gpu.py's median timer; ``settings``: the ``GPUSettings`` of both models (None: the model
    layer's defaults). ``pipe`` comes back with the KV attention processors in place."""
    import numpy as np
    from diffusers import Flux2KleinKVPipeline
    from PIL import Image

    from klein_ray.model.pipeline import KleinModel, RenderRequest

    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n_refs)]

    def request(i: int) -> RenderRequest:
        return RenderRequest(prompts=[PROMPT], seeds=[1000 + i], width=size, height=size, steps=STEPS,
                             guidance=1.0, references=refs)

    # 1. Without KV first: building the KV pipeline swaps the shared transformer's processors.
    plain = KleinModel.from_pipe(pipe, settings=settings)
    without = timed(lambda i: plain.render(request(i)), device, reps)

    # 2. With KV, once its caching is seen to happen.
    kv = KleinModel.from_pipe(Flux2KleinKVPipeline(**pipe.components), settings=settings)
    modes = kv_modes(kv, request(0))
    if modes != ["extract"] + ["cached"] * (STEPS - 1):
        raise SystemExit(f"the KV pipeline did not cache the references' K/V: transformer modes {modes}")
    with_kv = timed(lambda i: kv.render(request(i)), device, reps)
    ref_tokens = n_refs * (size // 16) ** 2
    print(f"  KV edit {size}x{size}, {n_refs} references ({ref_tokens} reference tokens): without KV "
          f"{without:.3f} s/img, with KV {with_kv:.3f} s/img ({with_kv / without:.2f}x); modes {modes}",
          flush=True)
    return {"size": size, "references": n_refs, "reference_tokens": ref_tokens, "steps": STEPS,
            "without_kv_s_per_image": without, "with_kv_s_per_image": with_kv, "kv_modes": modes}


def kv_modes(model, request) -> list:
    """The ``kv_cache_mode`` of each transformer call during one render."""
    modes: list = []
    handle = model.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: modes.append(kwargs.get("kv_cache_mode")), with_kwargs=True)
    try:
        model.render(request)
    finally:
        handle.remove()
    return modes


def table(kv: dict) -> None:
    print("\n| variant | size | references | without KV s/img | with KV s/img | KV/without |")
    print("|---|---:|---:|---:|---:|---:|")
    a, b = kv["without_kv_s_per_image"], kv["with_kv_s_per_image"]
    print(f"| 9b | {kv['size']} | {kv['references']} | {a:.3f} | {b:.3f} | {b / a:.2f} |")

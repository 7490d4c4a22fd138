"""The KV variant (``pipeline: kv``, diffusers' ``Flux2KleinKVPipeline``, BFL's 9B-KV) on the tiny
KV checkpoint: it loads as KV (also under 'auto'), our render path gives exactly what diffusers'
own KV call gives, the reference tokens' K/V really are computed once and reused, and a job with
a KV variant renders reference rows end to end on the in-process executor.

The KV-ness of a checkpoint is nothing but model_index.json's class name, so every test here
would pass on the plain pipeline's numbers if we silently loaded the plain class: the caching
test is the one that tells them apart (the plain pipeline runs the reference tokens through the
transformer at every step and never builds a cache).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_done, row, write_manifest
from PIL import Image

from klein_ray.config import JobConfig, RunConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.model.pipeline import KleinModel, RenderRequest
from klein_ray.scheduling.driver import EXIT_OK, Driver, RenderJob
from klein_ray.storage import LocalStore
from klein_ray.worker.render import RenderWorker

KV = "Flux2KleinKVPipeline"
REF_SIZES = [(64, 64), (96, 64), (64, 128)]  # (width, height): three sizes, so token counts differ
CASES = {"text": 0, "single": 1, "multi": 3}  # how many of the references each case uses


def _references(sizes=REF_SIZES, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _tokens(width: int, height: int) -> int:
    # One latent token per 16x16 pixels: the VAE's x8 and the 2x2 patches.
    return (width // 16) * (height // 16)


@pytest.fixture(scope="module")
def kv_model(tiny_models):
    return KleinModel.from_pretrained(str(tiny_models["tiny-kv"]), pipeline="auto", threads=2)


def _direct(pipe, prompts, seeds, references, size=64, steps=3):
    """diffusers' own KV call: prompts as text (its full encoder), one CPU generator per image."""
    with torch.inference_mode():
        return pipe(prompt=list(prompts), image=list(references) or None, height=size, width=size,
                    num_inference_steps=steps, max_sequence_length=512,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images


class _TransformerCalls:
    """Every transformer call of a render: its KV mode, the tokens it was given, and the cache it
    used or returned, inspected while the pipeline still holds it (it clears it when done)."""

    def __init__(self, transformer):
        self.calls: list[dict] = []
        self._handles = [transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                         transformer.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs):
        cache = kwargs.get("kv_cache")
        self.calls.append({
            "mode": kwargs.get("kv_cache_mode"), "tokens": kwargs["hidden_states"].shape[1],
            "ref_tokens": kwargs.get("num_ref_tokens", 0), "cache_in": cache,
            "cache_in_filled": cache is not None and all(
                c.k_ref is not None for c in cache.double_block_caches + cache.single_block_caches),
        })

    def _after(self, module, args, kwargs, output):
        cache = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        self.calls[-1]["cache_out"] = cache
        if cache is not None:
            layers = cache.double_block_caches + cache.single_block_caches
            self.calls[-1]["cache_out_shapes"] = {tuple(c.k_ref.shape) for c in layers if c.k_ref is not None}
            self.calls[-1]["cache_out_layers"] = sum(c.k_ref is not None for c in layers)

    def close(self):
        for h in self._handles:
            h.remove()


def test_a_kv_checkpoint_is_laid_out_like_bfls_and_loads_as_kv(tiny_models):
    """model_index.json names the KV class and nothing else differs from the plain layout; 'auto'
    and 'kv' load it as KV; 'distilled'/'base' would drop its cache, so they are refused."""
    kv_dir, plain_dir = tiny_models["tiny-kv"], tiny_models["tiny"]
    index = json.loads((kv_dir / "model_index.json").read_text())
    plain_index = json.loads((plain_dir / "model_index.json").read_text())
    assert index["_class_name"] == KV and "is_distilled" not in index
    assert {k: v for k, v in index.items() if not k.startswith("_")} == {
        k: v for k, v in plain_index.items() if not k.startswith("_") and k != "is_distilled"}
    transformer_cfg = json.loads((kv_dir / "transformer" / "config.json").read_text())
    assert transformer_cfg["_class_name"] == "Flux2Transformer2DModel"  # no KV flag in the weights

    for choice in ("auto", "kv"):
        model = KleinModel.from_pretrained(str(kv_dir), pipeline=choice, threads=1)
        assert (model.info.pipeline_class, model.info.distilled, model.default_steps()) == (KV, True, 4)
        processors = {type(b.attn.processor).__name__ for b in model.pipe.transformer.transformer_blocks}
        assert processors == {"Flux2KVAttnProcessor"}
    for choice in ("distilled", "base"):
        with pytest.raises(ValueError, match="KV checkpoint"):
            KleinModel.from_pretrained(str(kv_dir), pipeline=choice, threads=1)
    plain = KleinModel.from_pretrained(str(plain_dir), pipeline="auto", threads=1)
    assert plain.info.pipeline_class == "Flux2KleinPipeline"  # auto leaves plain checkpoints plain


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prompts", [("a lamp", "a chair"), ("a lamp", "a lamp")], ids=["two-prompts", "same-prompt"])
def test_kv_render_equals_diffusers_kv_call(kv_model, case, prompts):
    """Our path (trimmed, cached text encoder; prompt_embeds; num_images_per_prompt for one
    prompt) renders bitwise what Flux2KleinKVPipeline.__call__ renders from the text itself, on
    the same pipeline object. Bitwise, not a tolerance: the embeddings are the same tensors
    (test_model's trimmed-encoder test), the batch and the generators are the same, on one CPU."""
    refs = _references()[:CASES[case]]
    ours = kv_model.render(RenderRequest(list(prompts), [11, 12], 64, 64, 3, 1.0, references=refs)).images
    theirs = _direct(kv_model.pipe, prompts, [11, 12], refs)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


def test_kv_path_extracts_reference_kv_once_and_reuses_it(kv_model):
    """Step 0 runs the reference tokens and returns a filled cache (every layer's K/V, for every
    image and reference token); steps 1-3 get only the image tokens and that same cache. Text-only
    requests take the plain forward. The non-KV pipeline would show mode None and reference
    tokens at every step: this test fails if we rendered KV checkpoints through it."""
    pipe = kv_model.pipe
    layers = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    heads, head_dim = pipe.transformer.config.num_attention_heads, pipe.transformer.config.attention_head_dim
    refs = _references()
    ref_tokens, image_tokens = sum(_tokens(w, h) for w, h in REF_SIZES), _tokens(64, 64)
    calls = _TransformerCalls(pipe.transformer)
    try:
        kv_model.render(RenderRequest(["a lamp", "a chair"], [1, 2], 64, 64, 4, 1.0, references=refs))
        edit, calls.calls = calls.calls, []
        kv_model.render(RenderRequest(["a lamp"], [1], 64, 64, 4, 1.0))
        text = calls.calls
    finally:
        calls.close()

    assert [c["mode"] for c in edit] == ["extract", "cached", "cached", "cached"]
    first, rest = edit[0], edit[1:]
    assert (first["tokens"], first["ref_tokens"]) == (ref_tokens + image_tokens, ref_tokens)
    assert first["cache_out_layers"] == layers
    assert first["cache_out_shapes"] == {(2, ref_tokens, heads, head_dim)}
    for call in rest:
        assert call["tokens"] == image_tokens  # the reference tokens are not run again
        assert call["cache_in"] is first["cache_out"] and call["cache_in_filled"]
    assert [c["mode"] for c in text] == [None] * 4 and {c["tokens"] for c in text} == {image_tokens}


# -- end to end: a job with a KV variant on the in-process executor ----------------------------

def _kv_job(tiny_models) -> JobConfig:
    return JobConfig(
        default_variant="kv",
        variants={"kv": VariantConfig(source=str(tiny_models["tiny-kv"]), pipeline="kv", batch_size=2)},
        run=RunConfig(in_flight_per_actor=2),
    )


def _write_references(directory) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(_references(seed=7)):
        path = directory / f"ref{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def test_a_kv_variant_renders_reference_rows_end_to_end(tmp_path, tiny_models):
    """Multi-reference, single-reference and text-only rows of a `pipeline: kv` variant, with
    PNG references beside the manifest (where confinement allows them by default): every row
    commits, its metadata names the KV pipeline and its references, every reference unit ran
    extract-then-cached, and each stored image is bitwise what diffusers' KV call renders for
    the batch the metadata records (a lossless PNG, the same worker's pipeline)."""
    job = tmp_path / "job"
    refs = _write_references(job / "refs")
    rows = [row(id=f"multi{i}", prompt=f"combine these {i}", references=refs, width=64, height=64, seed=i)
            for i in range(2)]
    rows += [row(id="single", prompt="replace the background", references=refs[1:2], width=64, height=64, seed=5),
             row(id="text0", prompt="a mug", width=64, height=64, seed=6),
             row(id="text1", prompt="a vase", width=64, height=64, seed=7)]
    manifest = write_manifest(job / "m.parquet", rows)
    workers, modes = [], []

    def watched(spec):
        worker = RenderWorker.load(spec)
        worker.model.pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: modes.append(kw.get("kv_cache_mode")), with_kwargs=True)
        workers.append(worker)
        return worker

    summary, code = Driver(RenderJob(str(manifest), str(tmp_path / "out"), _kv_job(tiny_models)),
                           lambda: InProcessExecutor(watched)).run()
    assert code == EXIT_OK and summary["committed"] == 5, summary
    # Units: the two multi rows together, the single row, the two text rows; 4 steps each.
    assert sorted(modes, key=str) == sorted(["extract", "cached", "cached", "cached"] * 2 + [None] * 4, key=str)

    store, pipe = LocalStore(tmp_path / "out"), workers[0].model.pipe
    metas = {r["id"]: assert_done(store, r["id"]) for r in rows}
    by_id = {r["id"]: r for r in rows}
    for row_id, meta in metas.items():
        assert meta["model"]["pipeline"] == KV and meta["steps"] == 4 and meta["guidance"] is None
        assert [r["uri"] for r in meta["references"]] == [f"file://{p}" for p in by_id[row_id]["references"] or []]
        batch = [by_id[i] for i in meta["batch"]["ids"]]
        images = [Image.open(p).convert("RGB") for p in by_id[row_id]["references"] or []]
        expected = _direct(pipe, [r["prompt"] for r in batch], [r["seed"] for r in batch], images, steps=4)
        stored = Image.open(store.root / meta["image"]["key"])
        assert np.array_equal(np.asarray(stored), np.asarray(expected[meta["batch"]["position"]])), row_id

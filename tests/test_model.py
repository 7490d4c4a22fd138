"""The model layer on the tiny real pipeline (no Ray): loading, the trimmed text encoder, the
prompt cache, same-prompt batches, and loud input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from klein_ray.model.pipeline import KleinModel, ModelInputError, RenderRequest
from klein_ray.model.text import PromptEncoder

PROMPTS = ["a red sneaker on white", "a ceramic mug, soft light " * 8, "", "a red sneaker on white"]


@pytest.fixture(scope="module")
def model(tiny_models):
    return KleinModel.from_pretrained(str(tiny_models["tiny"]), pipeline="distilled", threads=2)


@pytest.mark.parametrize("max_len", [512, 64])
def test_trimmed_encoder_equals_diffusers_encode_prompt(model, max_len):
    """Stopping at layer 27 with no logits head gives diffusers' embeddings exactly."""
    pipe = model.pipe
    expected, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=max_len)
    ours, counts = PromptEncoder(pipe.text_encoder, pipe.tokenizer, cache_size=0).encode(PROMPTS, max_len)
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected)
    assert counts[0] == counts[3] and counts[1] > counts[0]


def test_prompt_cache_hits_and_evicts(model):
    pipe = model.pipe
    enc = PromptEncoder(pipe.text_encoder, pipe.tokenizer, cache_size=2)
    first, _ = enc.encode(["a", "b"])
    again, _ = enc.encode(["b", "a"])
    assert enc.misses == 2 and enc.hits == 2
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])
    enc.encode(["c"])  # evicts the least recently used ("b" was used before "a")
    enc.encode(["b"])
    assert enc.misses == 4


def test_same_prompt_batch_matches_separate_calls(model):
    """Rows that differ only by seed go through num_images_per_prompt; same pixels as one by one."""
    req = RenderRequest(prompts=["a lamp"] * 3, seeds=[1, 2, 3], width=64, height=64, steps=2, guidance=1.0)
    batched = model.render(req).images
    for image, seed in zip(batched, req.seeds):
        single = model.render(RenderRequest(["a lamp"], [seed], 64, 64, 2, 1.0)).images[0]
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(single, np.int16)).max()
        assert diff <= 2


def test_render_rejects_what_diffusers_would_alter(model):
    with pytest.raises(ModelInputError, match="multiples of 16"):
        model.render(RenderRequest(["x"], [1], 72, 64, 1, 1.0))
    tiny = Image.new("RGB", (40, 40))
    with pytest.raises(ModelInputError, match="at least 64"):
        model.render(RenderRequest(["x"], [1], 64, 64, 1, 1.0, references=[tiny]))
    strip = Image.new("RGB", (1000, 100))
    with pytest.raises(ModelInputError, match="8:1"):
        model.render(RenderRequest(["x"], [1], 64, 64, 1, 1.0, references=[strip]))
    with pytest.raises(ModelInputError, match="one seed per prompt"):
        model.render(RenderRequest(["x", "y"], [1], 64, 64, 1, 1.0))


def test_loaded_through_from_pretrained_with_its_flags(tiny_models):
    base = KleinModel.from_pretrained(str(tiny_models["tiny-base"]), pipeline="auto", threads=1)
    assert base.info.distilled is False and base.default_steps() == 50
    forced = KleinModel.from_pretrained(str(tiny_models["tiny-base"]), pipeline="distilled", threads=1)
    assert forced.info.distilled is True and forced.default_steps() == 4
    assert base.info.pipeline_class == "Flux2KleinPipeline" and base.info.dtype == "float32"


def test_from_pipe_wraps_an_in_memory_pipeline_like_a_loaded_one(model):
    """The benchmarks' route (a pipeline built in memory) renders exactly what from_pretrained's does."""
    from klein_ray.model.tiny import build_tiny_pipeline

    wrapped = KleinModel.from_pipe(build_tiny_pipeline(seed=0, distilled=True))
    assert set(vars(wrapped)) == set(vars(model))
    assert (wrapped.info.distilled, wrapped.info.pipeline_class, wrapped.info.dtype) == (
        model.info.distilled, model.info.pipeline_class, model.info.dtype)
    assert wrapped.info.source == "(in memory)" and wrapped.device == "cpu"
    req = RenderRequest(prompts=["a lamp", "a chair"], seeds=[1, 2], width=64, height=64, steps=2, guidance=1.0)
    for a, b in zip(model.render(req).images, wrapped.render(req).images):
        assert np.array_equal(np.asarray(a), np.asarray(b))

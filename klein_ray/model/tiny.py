"""Builds the tiny, randomly initialised FLUX.2 [klein] pipeline used by the demo and the tests.

The result is a real diffusers directory (``model_index.json``, ``scheduler/``, ``tokenizer/``,
``text_encoder/``, ``transformer/``, ``vae/``) that loads through exactly the same
``from_pretrained`` path as the published checkpoints. It is built entirely offline: the
tokenizer is a byte-level BPE trained here on a few sentences. Its images are noise: it proves
the plumbing, never the model's quality.

With ``kv=True`` it is laid out like BFL's FLUX.2-klein-9b-kv: the very same components and
weight files, only ``model_index.json`` names ``Flux2KleinKVPipeline`` (that class name is all
that makes a diffusers checkpoint KV; the transformer class and its config are unchanged).
"""

from __future__ import annotations

import json
from pathlib import Path

from klein_ray.types import TEST_MODEL_MARKER

# The real Qwen3 chat template reduced to what the pipeline uses: one user turn, the generation
# prompt and, with enable_thinking=False, the empty think block Qwen3 emits.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEXT_HIDDEN = 32  # joint_attention_dim = 3 x this (hidden states 9, 18 and 27 are stacked)
TEXT_LAYERS = 36  # so that the pipeline's default out-layers (9, 18, 27) exist
_CORPUS = [
    "a studio photo of a red sneaker on a white background",
    "product shot of a ceramic mug, soft light, catalog style",
    "a watercolor painting of mountains at sunrise",
    "replace the background with a sunny beach; keep the product unchanged",
    "combine the jacket from image one with the model in image two",
    "the quick brown fox jumps over the lazy dog 0123456789",
]


def build_tiny_pipeline(seed: int = 0, distilled: bool = True, kv: bool = False):
    """Return an in-memory ``Flux2KleinPipeline`` (``Flux2KleinKVPipeline`` with ``kv``) with tiny
    random weights (seeded). A KV pipeline is always distilled, as BFL's 9B-KV is."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    if kv and not distilled:
        raise ValueError("a KV checkpoint is distilled (no CFG): kv=True needs distilled=True")
    parts = _tiny_parts(seed)
    if kv:
        # The same parts under the KV class, which swaps in the K/V-caching attention processors;
        # saved, its model_index.json names Flux2KleinKVPipeline and nothing else changes (the
        # class registers no is_distilled: a KV checkpoint is distilled).
        return Flux2KleinKVPipeline(**parts)
    return Flux2KleinPipeline(**parts, is_distilled=distilled)


def _tiny_parts(seed: int) -> dict:
    """The pipeline's five components, tiny and randomly initialised (seeded)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # 1. Tokenizer: trained offline (the Hub's tiny test tokenizers are not reachable here).
    tokenizer = _train_tokenizer()

    # 2. Text encoder: real Qwen3 architecture, 36 layers so out-layers 9/18/27 exist, tiny width.
    torch.manual_seed(seed)
    text_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = Qwen3ForCausalLM(text_config).eval()

    # 3. Transformer: FLUX.2's in_channels=128 and rope layout, one double + two single blocks.
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    ).eval()  # type: ignore[attr-defined]

    # 4. VAE: four small blocks (scale factor 8 like the real one), 32 latent channels, 2x2 patches.
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
        patch_size=(2, 2),
    ).eval()  # type: ignore[attr-defined]

    # 5. Scheduler: the real checkpoints' settings (shift 3.0, dynamic shifting).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer}


def make_tiny_model(directory: str | Path, seed: int = 0, distilled: bool = True, kv: bool = False) -> Path:
    """Write the tiny pipeline in diffusers layout to ``directory`` and return its path; with ``kv``
    a KV checkpoint (``model_index.json`` names ``Flux2KleinKVPipeline``)."""
    out = Path(directory)
    pipe = build_tiny_pipeline(seed=seed, distilled=distilled, kv=kv)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # Say plainly what this is, for anyone who finds the folder later.
    (out / "README.md").write_text(
        "# tiny-klein (random weights)\n\nA randomly initialised FLUX.2 [klein] pipeline built "
        "offline by `klein-ray make-tiny-model`. Its images are noise: it exists to exercise "
        "loading, batching and storage, never to judge quality.\n"
    )
    (out / TEST_MODEL_MARKER).write_text(json.dumps({"seed": seed, "distilled": distilled, "kv": kv}))
    return out


# The transformer's linear layers a tiny LoRA adapts: every attention projection and MLP.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "to_qkv_mlp_proj", "linear_in", "linear_out"]


def make_tiny_lora(model_dir: str | Path, lora_dir: str | Path, seed: int = 0, rank: int = 4,
                   strength: float = 0.8) -> Path:
    """A random LoRA for the tiny model at ``model_dir``, written as diffusers'
    ``save_lora_weights`` writes one (``pipe.load_lora_weights(lora_dir)`` finds it): rank
    ``rank`` on every attention projection and MLP, weights drawn at ``strength``, so its effect
    on the tiny model's images is plain (tens of levels of 255), never a rounding difference.
    Like the model, it is noise; it exists to test adapters end to end."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = Flux2Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    present = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in transformer.named_modules())]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=present,
                                       init_lora_weights=False), adapter_name="tiny")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * strength)
    out = Path(lora_dir)
    out.mkdir(parents=True, exist_ok=True)
    Flux2KleinPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(
        transformer, adapter_name="tiny"))
    (out / "README.md").write_text(
        "# a tiny random LoRA\n\nRandom weights for the tiny test model, written by `klein-ray "
        f"make-tiny-lora` (seed {seed}). Its effect on images is plain and meaningless.\n")
    return out


def is_tiny_model(directory: str | Path) -> bool:
    return (Path(directory) / TEST_MODEL_MARKER).is_file()


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return _as_qwen2(tokenizer)


def _as_qwen2(tokenizer):
    """Re-wrap as Qwen2's tokenizer class, which model_index.json names for the real models."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "Qwen2Tokenizer"
        cfg_path.write_text(json.dumps(cfg))
        return AutoTokenizer.from_pretrained(tmp)

"""Prompt embeddings for FLUX.2 [klein]: the same tensors as diffusers' ``encode_prompt``, for less work.

diffusers runs all 36 Qwen3 layers and the full-vocabulary logits head to keep hidden states
(9, 18, 27). Here the decoder stops after the deepest layer needed (27 of 36) and never computes
logits; hooks on the decoder layers record the same hidden states the model would report.
Embeddings are cached per prompt (LRU), since catalog and dataset jobs repeat prompts.
No I/O; torch only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

DEFAULT_OUT_LAYERS = (9, 18, 27)


class _Enough(Exception):
    """Raised from the last needed layer's hook to skip the remaining layers."""


class PromptEncoder:
    def __init__(self, text_encoder, tokenizer, out_layers=DEFAULT_OUT_LAYERS, cache_size: int = 1024):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.out_layers = tuple(out_layers)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], tuple[object, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, prompts: list[str], max_sequence_length: int = 512):
        """(embeddings [B, L, 3*hidden] on the encoder's device, untruncated token counts)."""
        import torch

        found: dict[str, tuple[Any, int]] = {}  # prompt -> (embedding tensor, token count)
        for p in dict.fromkeys(prompts):
            if (p, max_sequence_length) in self._cache:
                self._cache.move_to_end((p, max_sequence_length))
                found[p] = self._cache[(p, max_sequence_length)]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            embeds = self._encode(missing, max_sequence_length)
            for prompt, embed, count in zip(missing, embeds, self.token_counts(missing)):
                found[prompt] = (embed, count)
                self._remember((prompt, max_sequence_length), (embed, count))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        return torch.stack([found[p][0] for p in prompts]), [found[p][1] for p in prompts]

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens each prompt takes with the chat template, before any truncation."""
        return [len(self.tokenizer(self._template(p))["input_ids"]) for p in prompts]

    # -- internals -------------------------------------------------------------------------

    def _template(self, prompt: str) -> str:
        # Exactly diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds formatting.
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False,
        )

    def _encode(self, prompts: list[str], max_sequence_length: int):
        import torch

        # 1. Tokenize like diffusers: padded to max_sequence_length, truncated.
        batch = [self.tokenizer(self._template(p), return_tensors="pt", padding="max_length",
                                truncation=True, max_length=max_sequence_length) for p in prompts]
        device = next(self.text_encoder.parameters()).device
        input_ids = torch.cat([b["input_ids"] for b in batch]).to(device)
        attention_mask = torch.cat([b["attention_mask"] for b in batch]).to(device)

        # 2. Run the decoder (no logits head) only as deep as the deepest layer needed.
        captured = self._run_trimmed(input_ids, attention_mask)

        # 3. Stack layers and fold them into the channel axis, as the pipeline does.
        out = torch.stack([captured[k] for k in self.out_layers], dim=1).to(self.text_encoder.dtype)
        b, c, length, hidden = out.shape
        return out.permute(0, 2, 1, 3).reshape(b, length, c * hidden)

    def _run_trimmed(self, input_ids, attention_mask) -> dict:
        import torch

        decoder = self.text_encoder.model  # Qwen3Model: the causal LM without its head
        last = max(self.out_layers)
        captured: dict[int, object] = {}
        if 0 in self.out_layers:
            captured[0] = decoder.embed_tokens(input_ids)

        def hook(index):
            # hidden_states[i] in transformers is the output of decoder layer i-1.
            def record(module, args, output):
                captured[index + 1] = output[0] if isinstance(output, tuple) else output
                if index + 1 == last:
                    raise _Enough
            return record

        handles = [decoder.layers[k - 1].register_forward_hook(hook(k - 1)) for k in self.out_layers if k > 0]
        try:
            with torch.inference_mode():
                decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Enough:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def _remember(self, key, value) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

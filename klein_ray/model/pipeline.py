"""The model layer: loads one FLUX.2 [klein] variant with diffusers and renders requests.

The model package is the only place that imports torch and diffusers, and it imports nothing of
klein_ray but the shared types. It does no storage or network I/O of its own: it receives a
local directory or a Hugging Face repo id (or a pipeline in memory), prompts, seeds and
already-decoded reference images, and returns PIL images. Inputs are validated loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from klein_ray.model import accel
from klein_ray.model.accel import GPUSettings, WarmupShape
from klein_ray.model.adapters import Adapter, AdapterError, AdapterSwitch
from klein_ray.model.adapters import load as load_adapters
from klein_ray.model.limits import shape_problem, side_problem
from klein_ray.model.text import PromptEncoder
from klein_ray.types import RenderOOM

DISTILLED_STEPS = 4
BASE_STEPS = 50
WARMUP_STEPS = 2  # the KV pipeline's first step (extract the references' K/V) differs from the rest


class ModelInputError(ValueError):
    """A request the pipeline would reject or silently alter (row-level error)."""


@dataclass
class RenderRequest:
    """One diffusers call: prompts share size, steps, guidance and the reference set."""

    prompts: list[str]
    seeds: list[int]
    width: int | None
    height: int | None
    steps: int | None
    guidance: float
    references: list[Any] = field(default_factory=list)  # PIL images, RGB
    max_sequence_length: int = 512
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale) active for the call


@dataclass
class RenderResult:
    images: list[Any]  # PIL images, one per prompt, in order
    prompt_tokens: list[int]  # each prompt's length in tokens before the encoder's truncation


@dataclass(frozen=True)
class ModelInfo:
    source: str
    pipeline_class: str
    distilled: bool
    dtype: str
    device: str
    versions: dict[str, str]


class KleinModel:
    """A pipeline ready to render, plus what a render needs to know about it.

    Build one with ``from_pretrained`` (a local diffusers directory or a Hub repo id) or
    ``from_pipe`` (a pipeline already in memory, as the benchmarks build full-size ones).
    """

    def __init__(self, pipe, *, source: str, device: str | None = None, prompt_cache: int = 1024,
                 settings: GPUSettings | None = None, file_scales: dict[str, float] | None = None,
                 adapters: tuple[Adapter, ...] = (), always: tuple[str, ...] = ()):
        import diffusers
        import torch
        import transformers

        # 1. Where it runs: the given device, else where the weights already are.
        self.pipe = pipe
        self.device = device or str(pipe.transformer.device.type)
        self.dtype = pipe.transformer.dtype

        # 2. Placement and accelerator settings (klein_ray.model.accel), then the trimmed,
        #    cached text encoder. ``file_scales``: layers a float8 checkpoint gave (kept as is).
        self.settings = accel.resolve(settings or GPUSettings(), self.device, bool(file_scales))
        self.adapters = AdapterSwitch(pipe)
        if adapters:  # before placement and compile: LoRA layers move and compile with the blocks
            if self.settings.get("precision") == "fp8":
                raise AdapterError("LoRA adapters need the transformer in bf16 (precision: bf16): "
                                   "float8 layers cannot carry them")
            load_adapters(pipe, list(adapters), list(always))
        self.accel_report = accel.apply(self.pipe, self.device, self.settings, file_scales)
        self.pipe.set_progress_bar_config(disable=True)
        self.encoder = PromptEncoder(self.pipe.text_encoder, self.pipe.tokenizer, cache_size=prompt_cache)

        # 3. What the records say about it; KV checkpoints are distilled whatever they say.
        kv = type(pipe).__name__ == "Flux2KleinKVPipeline"
        distilled = bool(getattr(self.pipe.config, "is_distilled", True)) or kv
        self.info = ModelInfo(
            source=source,
            pipeline_class=type(pipe).__name__,
            distilled=distilled,
            dtype=str(self.dtype).replace("torch.", ""),
            device=self.device,
            versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                      "transformers": transformers.__version__},
        )

    @classmethod
    def from_pretrained(cls, source: str, pipeline: str = "auto", dtype: str = "auto",
                        device: str | None = None, threads: int | None = None,
                        prompt_cache: int = 1024, settings: GPUSettings | None = None,
                        transformer_file: str | None = None, adapters: tuple[Adapter, ...] = (),
                        always: tuple[str, ...] = ()) -> KleinModel:
        """Load ``source`` (a local diffusers directory or a Hub repo id) with diffusers'
        ``from_pretrained``; ``pipeline`` 'base'/'distilled' override the checkpoint's flag,
        'kv' loads it as ``Flux2KleinKVPipeline``, 'auto' as its model_index.json says.
        ``transformer_file``: a local BFL-layout single file (bf16, fp8, nvfp4) whose weights
        replace ``source``'s transformer (see ``klein_ray.model.quantized``). ``adapters``:
        local LoRA files loaded once (``always``: fused), chosen per call (``klein_ray.model.adapters``)."""
        import diffusers
        import torch
        import transformers

        # 1. Where and how to run.
        if threads:
            torch.set_num_threads(int(threads))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")

        # 2. Which pipeline class, and the checkpoint's own flag overridden on request.
        pipe_cls = _pipeline_class(source, pipeline)
        kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device)}
        if pipeline in ("base", "distilled"):
            kwargs["is_distilled"] = pipeline == "distilled"

        # 3. Load: a local directory or a Hub repo id, the same code path either way. No
        #    progress bars: a batch job loads many times and its logs are read by machines.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        file_scales = None
        if transformer_file:  # the base checkpoint's own transformer weights are never read
            from klein_ray.model.quantized import load_transformer

            loaded = load_transformer(source, transformer_file, kwargs["dtype"])
            kwargs["transformer"], file_scales = loaded.model, loaded.fp8_scales
        pipe = pipe_cls.from_pretrained(source, **kwargs)
        return cls(pipe, source=source, device=device, prompt_cache=prompt_cache, settings=settings,
                   file_scales=file_scales, adapters=adapters, always=always)

    @classmethod
    def from_pipe(cls, pipe, source: str = "(in memory)", device: str | None = None,
                  prompt_cache: int = 1024, settings: GPUSettings | None = None) -> KleinModel:
        """Wrap a pipeline already in memory (like diffusers' ``from_pipe``). Settings change
        ``pipe`` in place (compile, channels-last): measure diffusers' own call before wrapping."""
        return cls(pipe, source=source, device=device, prompt_cache=prompt_cache, settings=settings)

    def warm_up(self, shapes: list[WarmupShape]) -> dict:
        """Render one throw-away call per shape (two steps, grey references) so that compiling
        happens here, at load, not inside a unit; nothing when the model is not compiled.
        Returns the calls made, the seconds, the graphs traced and how many of them were
        compiled anew (not found in the compile caches)."""
        from PIL import Image

        if not self.settings["compile"] or not shapes:
            return {"calls": 0, "seconds": 0.0, "graphs": 0, "compiled": 0}
        before, misses, started = accel.compiled_graphs(), accel.fresh_compiles(), time.perf_counter()
        for shape in shapes:
            grey = Image.new("RGB", (shape.width, shape.height), (128, 128, 128))
            self.render(RenderRequest(prompts=["warm-up"] * shape.batch, seeds=list(range(shape.batch)),
                                      width=shape.width, height=shape.height, steps=WARMUP_STEPS, guidance=1.0,
                                      references=[grey] * shape.references))
        return {"calls": len(shapes), "seconds": round(time.perf_counter() - started, 3),
                "graphs": accel.compiled_graphs() - before, "compiled": accel.fresh_compiles() - misses}

    def compile_artifacts(self) -> bytes | None:
        """What this process compiled, for a later process to load (None: nothing)."""
        return accel.save_artifacts()

    def artifact_key(self) -> str:
        """The name this model's artifacts are kept under (see ``accel.artifact_key``)."""
        return accel.artifact_key(self.pipe, self.device, self.settings)

    def load_compile_artifacts(self, data: bytes) -> bool:
        """Seed the compile caches before the first call (see ``accel.load_artifacts``)."""
        return self.settings["compile"] and accel.load_artifacts(data)

    def default_steps(self) -> int:
        return DISTILLED_STEPS if self.info.distilled else BASE_STEPS

    def render(self, req: RenderRequest) -> RenderResult:
        """Render one image per prompt; image i depends only on (prompt i, seed i, the rest)."""
        import torch

        # 1. Validate: what diffusers would reject mid-batch, or alter with only a warning.
        self._check(req)

        # 2. Prompt embeddings: trimmed encoder, cached; one copy when only seeds differ.
        same_prompt = len(set(req.prompts)) == 1
        prompts = req.prompts[:1] if same_prompt else list(req.prompts)
        embeds, tokens = self.encoder.encode(prompts, req.max_sequence_length)

        # 3. The call's LoRA adapters (switched only when they differ from the last call's), and
        #    one CPU generator per image: noise independent of batch position and device.
        self.adapters.apply(req.adapters)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in req.seeds]

        # 4. Call the pipeline.
        kwargs: dict[str, Any] = dict(
            prompt_embeds=embeds,
            num_images_per_prompt=len(req.prompts) if same_prompt else 1,
            image=list(req.references) or None,
            height=req.height,
            width=req.width,
            num_inference_steps=req.steps or self.default_steps(),
            generator=generators,
            max_sequence_length=req.max_sequence_length,
        )
        if self.info.pipeline_class != "Flux2KleinKVPipeline":
            # Distilled models ignore guidance; passing 1.0 avoids diffusers' warning per call.
            kwargs["guidance_scale"] = 1.0 if self.info.distilled else float(req.guidance)
            if not self.info.distilled:
                negative, _ = self.encoder.encode([""] * len(prompts), req.max_sequence_length)
                kwargs["negative_prompt_embeds"] = negative
        try:
            with torch.inference_mode():
                images = self.pipe(**kwargs).images
        except torch.OutOfMemoryError as exc:
            # A type the driver can classify without importing torch: it splits the batch.
            raise RenderOOM(f"out of memory rendering {len(req.prompts)} images "
                            f"at {req.width}x{req.height}") from exc

        # 5. Check the result has the shape we promised.
        if len(images) != len(req.prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(req.prompts)} prompts")
        return RenderResult(images, tokens * len(req.prompts) if same_prompt else tokens)

    @staticmethod
    def _check(req: RenderRequest) -> None:
        if not req.prompts or len(req.prompts) != len(req.seeds):
            raise ModelInputError("need one seed per prompt and at least one prompt")
        for side in (req.width, req.height):
            problem = side_problem(side)
            if problem:
                raise ModelInputError(problem)
        for i, ref in enumerate(req.references):
            problem = shape_problem(*ref.size)
            if problem:
                raise ModelInputError(f"reference {i}: {problem}")


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


KV_PIPELINE = "Flux2KleinKVPipeline"


def _pipeline_class(source: str, pipeline: str):
    """The diffusers class to load ``source`` with.

    A KV checkpoint differs from the others only by model_index.json's ``_class_name``, and
    ``Flux2KleinPipeline.from_pretrained`` loads one without a word as the plain pipeline (the
    caller's class wins over the file's): it would then render every step with the reference
    tokens and no K/V cache, slower and not as the KV model was trained. So 'auto' reads the
    name itself, and 'base'/'distilled' on a checkpoint that declares KV are refused. 'kv' is
    taken at its word (a checkpoint copied with a generic model_index.json is still KV)."""
    import diffusers

    if pipeline == "kv":
        return diffusers.Flux2KleinKVPipeline
    declared = _declared_class(source)
    if declared == KV_PIPELINE and pipeline != "auto":
        raise ValueError(f"{source} is a KV checkpoint (model_index.json names {KV_PIPELINE}): "
                         f"pipeline '{pipeline}' would render it without its K/V cache; use 'kv' or 'auto'")
    return diffusers.Flux2KleinKVPipeline if declared == KV_PIPELINE else diffusers.Flux2KleinPipeline


def _declared_class(source: str) -> str | None:
    """model_index.json's pipeline class name, or None where it cannot be read (from_pretrained
    then reports why, with the full story)."""
    import diffusers

    try:
        return diffusers.DiffusionPipeline.load_config(source).get("_class_name")
    except (OSError, ValueError):
        return None

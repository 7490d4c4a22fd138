"""The job config: typed, validated (pydantic), with a description on every field.

`render` works with only a manifest and an output: without `--config` the job uses one variant,
`tiny`, pointing at the offline tiny model (``./.cache/tiny-klein``), so nothing is downloaded by
surprise. Real jobs name their variants in YAML (see ``jobs/``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from klein_ray.uris import FILE, HF, S3, UriError, kind_of, local_path, parse

DEFAULT_TINY_MODEL = ".cache/tiny-klein"


class ConfigError(ValueError):
    """The job config cannot be used (exit code 2)."""


class _Strict(BaseModel):
    # Unknown keys are typos more often than intent: reject them loudly.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterConfig(_Strict):
    source: str = Field(
        description="The LoRA: a local .safetensors file or a directory holding one, an s3:// "
        "key or prefix (copied once per node into cache_dir), or a Hugging Face repo id. Local "
        "paths are made absolute on the driver (workers may run elsewhere)."
    )
    scale: float = Field(1.0, ge=-10, le=10, description="The adapter's weight when a row names "
                         "it without a scale of its own (the manifest's adapter_scales).")
    weight_name: str | None = Field(
        None, description="The file inside a directory, prefix or repo when it holds several "
        "(diffusers' weight_name); unset: the one .safetensors file there."
    )

    @field_validator("source")
    @classmethod
    def _absolute(cls, source: str) -> str:
        source = source.strip()
        if kind_of(source) == FILE and (source.startswith(("/", ".", "~", "file://")) or Path(source).exists()):
            return str(local_path(source))
        return source


class VariantConfig(_Strict):
    source: str = Field(
        description="Hugging Face repo id, a local diffusers directory, or an s3:// prefix of one "
        "(synced once per node into cache_dir)."
    )
    pipeline: Literal["auto", "distilled", "base", "kv"] = Field(
        "auto",
        description="Which FLUX.2 klein pipeline: 'distilled' (4-step), 'base' (undistilled, CFG), "
        "'kv' (Flux2KleinKVPipeline, reference K/V cached). 'auto' reads model_index.json.",
    )
    actors: int = Field(1, ge=1, le=1024, description="Ray actors that each keep this variant loaded.")
    gpus_per_actor: float = Field(0, ge=0, description="GPUs reserved per actor; 0 runs on CPU.")
    cpus_per_actor: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per actor. Unset: GPU actors reserve 1; CPU actors reserve none "
        "and share the node's cores (torch threads = node cores / CPU actors).",
    )
    batch_size: int = Field(4, ge=1, le=64, description="Most rows in one diffusers call.")
    steps: int | None = Field(
        None, ge=1, le=1000, description="Default denoising steps (4 distilled, 50 base)."
    )
    guidance: float = Field(
        4.0, ge=0, le=100, description="Default CFG scale; only used by base (undistilled) variants."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype: 'auto' is bfloat16 on GPU, float32 on CPU."
    )
    compile: bool | Literal["auto"] = Field(
        "auto", description="Regional torch.compile of the transformer's repeated blocks. 'auto': "
        "on for CUDA actors (an H100, 4B, 1024²: 0.474 -> 0.380 s/image with channels_last), off "
        "on CPU. Compiling happens at load, for the job's planned sizes (see `warmup`), and its "
        "artifacts are kept in run.compile_cache for the next actor or job.")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="Run the VAE in channels-last memory format. 'auto': on for CUDA actors.")
    precision: Literal["auto", "bf16", "fp8"] = Field(
        "auto", description="The transformer blocks' linear layers. 'bf16': in `dtype`. 'fp8': "
        "float8 weights and per-token dynamic float8 activations through scaled FP8 GEMMs; needs "
        "FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell), refused on other GPUs "
        "(runs, slowly, on CPU). 'auto': fp8 when `transformer` is a float8 file and the GPU has "
        "FP8 tensor cores (the file's weights are used as stored), else `dtype`.")
    warmup: bool = Field(
        True, description="When compiling: render throw-away calls at load for the job's most "
        "common planned sizes, a partial batch and batch 1, so that units never wait for a "
        "compile (a job with many sizes compiles about four times per block, never unboundedly).")
    cpu_offload: bool = Field(False, description="diffusers' model CPU offload, for cards smaller "
                              "than the model (CUDA only; slower).")
    prompt_cache: int = Field(1024, ge=0, description="Prompt embeddings kept per actor (LRU); 0 disables.")
    max_sequence_length: int = Field(
        512, ge=16, le=512, description="Text tokens given to the encoder (the pipeline's limit)."
    )
    transformer: str | None = Field(
        None,
        description="A single-file transformer checkpoint in BFL's (ComfyUI's) layout, bf16, fp8 "
        "or nvfp4 (e.g. BFL's FLUX.2-klein-4b-fp8), replacing the transformer of `source`, which "
        "still gives the text encoder, VAE, tokenizer, scheduler and the transformer's config. A "
        "local path or file:// URI (made absolute on the driver), s3://bucket/key (copied once "
        "per node into cache_dir) or hf://org/repo/file.safetensors. Quantized weights are "
        "dequantized to `dtype` when loaded.",
    )

    adapters: dict[str, AdapterConfig] = Field(
        default_factory=dict,
        description="LoRA adapters this variant's actors load once, with the model: name -> "
        "source, scale, weight_name. Rows choose among them (the manifest's adapters column); "
        "switching between units reloads no weights.",
    )
    always: list[str] = Field(
        default_factory=list,
        description="Adapters (names from `adapters`) applied to every row of the variant, fused "
        "into the weights at load (no cost per row). Rows cannot turn them off.",
    )

    @model_validator(mode="after")
    def _adapter_names(self) -> VariantConfig:
        for name in self.adapters:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-'")
        unknown = [n for n in self.always if n not in self.adapters]
        if unknown:
            raise ValueError(f"always names {unknown}, which adapters does not define (it has {sorted(self.adapters)})")
        return self

    @field_validator("transformer")
    @classmethod
    def _transformer_file(cls, ref: str | None) -> str | None:
        if ref is None:
            return None
        ref = ref.strip()
        if not ref.endswith(".safetensors"):
            raise ValueError(f"transformer {ref!r}: expected a .safetensors file")
        try:  # paths are made absolute: workers may run elsewhere than the driver's directory
            where = parse(ref, accept=(FILE, S3, HF), what="transformer location")
        except UriError as exc:
            raise ValueError(f"transformer {ref!r}: {exc}") from None
        if where.kind == S3 and (not where.bucket or not where.key):
            raise ValueError(f"transformer {ref!r}: expected s3://bucket/key.safetensors")
        if where.kind == HF and (len(parts := ref[len("hf://"):].split("/")) < 3 or not all(parts)):
            raise ValueError(f"transformer {ref!r}: expected hf://org/repo/file.safetensors")
        return str(where.path) if where.kind == FILE else ref


class StorageConfig(_Strict):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; when unset, AWS_ENDPOINT_URL_S3 is used."
    )
    region: str | None = Field(None, description="Region name for S3 requests.")
    max_attempts: int = Field(
        5, ge=1, le=20, description="botocore 'standard' mode total attempts per request."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a response.")
    outer_retry_seconds: float = Field(
        300.0, ge=0, description="How long klein-ray keeps retrying a transient storage failure "
        "after botocore gave up (outages outlast botocore's retry budget).",
    )

    def within(self, seconds: float) -> StorageConfig:
        """A copy whose every request gives up within about ``seconds``: one retry, short
        timeouts, no outer retry. For callers that must learn of an outage in time rather than
        ride it out (the output lease's renewals)."""
        step = max(0.5, seconds / 4)  # 2 attempts x (connect + read) ~ seconds
        return self.model_copy(update={"max_attempts": 2, "outer_retry_seconds": 0.0,
                                       "connect_timeout": min(self.connect_timeout, step),
                                       "read_timeout": min(self.read_timeout, step)})

    def resolved_endpoint(self) -> str | None:
        # The job config is the more deliberate choice; the environment fills in when it is silent.
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")


class OutputConfig(_Strict):
    format: Literal["png", "jpeg", "webp"] = Field("png", description="Default image format.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality.")
    webp_quality: int = Field(90, ge=1, le=100, description="WebP quality (lossy).")
    webp_lossless: bool = Field(False, description="Write lossless WebP instead.")
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level for PNG files; the pixels are the same at every "
        "level, only encoding time and size change. 1: 1.4x (a textured scene) to 6x (a smooth "
        "product shot) faster than 6 on 1024² photo-like images, files 6-18% larger; 6 (zlib's "
        "default): smaller files for more CPU per image; 9 gained nothing over 6. See "
        "benchmarks/README.md (PNG compression level)."
    )


class ReferenceConfig(_Strict):
    max_count: int = Field(10, ge=0, le=64, description="Most references one row may give.")
    max_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Size cap on every reference, from every source."
    )
    timeout: float = Field(30.0, gt=0, description="Connect/read timeout for http(s) references.")
    total_timeout: float | None = Field(None, gt=0, description="Most seconds one http(s) "
                                        "reference download may take in all, so a slow drip is cut "
                                        "off; unset: 4 x timeout.")
    max_pixels: int = Field(64_000_000, ge=4096, description="Most pixels a reference may "
                            "declare; larger images are refused before decoding.")
    allow_private_hosts: list[str] = Field(
        default_factory=list,
        description="http(s) hosts or CIDRs allowed although loopback/private/link-local.",
    )
    local_roots: list[str] | None = Field(
        None,
        description="Directories local (path, file://) references must lie under, symlinks "
        "followed; relative ones are taken from the driver's working directory. Unset: the "
        "manifest's directory, or none for a manifest in S3. []: no local references.",
    )
    s3_buckets: list[str] | None = Field(
        None,
        description="Buckets s3:// references may be read from. Unset: the manifest's bucket "
        "and the output's bucket (those in S3). []: no s3:// references.",
    )

    @field_validator("s3_buckets")
    @classmethod
    def _bucket_names(cls, buckets: list[str] | None) -> list[str] | None:
        # "s3://name/" is what users copy from a console; the bucket is what is compared.
        if buckets is None:
            return None
        names = [b.removeprefix("s3://").strip("/") for b in buckets]
        for given, name in zip(buckets, names):
            if not name or "/" in name:
                raise ValueError(f"{given!r} is not a bucket name (write the bucket alone, no key)")
        return names

    @field_validator("local_roots")
    @classmethod
    def _root_paths(cls, roots: list[str] | None) -> list[str] | None:
        if roots is not None and any(not r.strip() or ("://" in r and not r.startswith("file://"))
                                     for r in roots):
            raise ValueError("local_roots are directories: plain paths or file:// URIs")
        return roots


class RunConfig(_Strict):
    in_flight_per_actor: int = Field(
        3, ge=1, le=64, description="Work units given to each actor at once: one renders while "
        "the others fetch references or encode and upload, so the model never waits."
    )
    cache_dir: str = Field(
        "~/.cache/klein-ray", description="Per-node cache for models synced from s3://."
    )
    compile_cache: str | None = Field(
        None, description="Where compiled kernels are kept for the next actor or job (PyTorch's "
        "portable compile artifacts): a local directory or an s3:// prefix shared by the cluster. "
        "Unset: <cache_dir>/compile on each node. A missing or unusable entry only costs a compile."
    )
    model_load_attempts: int = Field(
        2, ge=1, le=10, description="Tries to load a variant before its rows are failed."
    )
    model_load_timeout: float = Field(
        1800.0, gt=0, description="Seconds to wait for a variant's actors to load their model "
        "(a first download of real weights, or a first compile, can take minutes)."
    )
    unit_timeout_s: float = Field(
        1800.0, gt=0, description="Seconds a work unit may take from its submission to its "
        "outcome (it may wait behind the actor's other in_flight_per_actor units for the model) "
        "before its worker counts as hung: the worker is replaced and the unit retried."
    )
    unreachable_after_s: float = Field(
        60.0, gt=0, description="Once rows fail to store because the output storage is "
        "unreachable (after every storage retry), seconds without any successful commit before "
        "the run stops with exit 75; nothing is lost, re-run later to resume."
    )
    ray_join_timeout_s: float = Field(
        120.0, gt=0, description="Seconds to join the Ray cluster (--address, RAY_ADDRESS, or the "
        "one `ray start` recorded on this node) or start a local one; past it the run ends with "
        "exit 2 and a message naming the address, what chose it, and how to use a fresh local "
        "Ray instead (--address local)."
    )
    lease_ttl_s: float = Field(
        60.0, ge=2, description="The output lease's time to live: the driver renews it every "
        "quarter of this; another driver takes it over only after seeing it unchanged this long "
        "on its own clock; a driver that cannot renew it for three quarters of this stops (exit 75)."
    )


# -- the report (the review sheet, _job/report.html) ------------------------------------------
class ReportConfig(_Strict):
    group_by: str | None = Field(
        None, description="Group the report's images into sections by this column of the rows "
        "(a passthrough column such as `sku`, or `variant`); unset: one grid. `klein-ray report "
        "OUT --group-by COL` rebuilds the page another way.")


class JobConfig(_Strict):
    default_variant: str = Field("tiny", description="Variant for rows that name none.")
    variants: dict[str, VariantConfig] = Field(
        default_factory=lambda: {"tiny": VariantConfig(source=DEFAULT_TINY_MODEL)},
        description="Variant name -> model source and actors.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="S3 settings.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output defaults.")
    references: ReferenceConfig = Field(
        default_factory=ReferenceConfig, description="Reference-image limits."
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Scheduling and caching.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="The report page.")

    @field_validator("variants")
    @classmethod
    def _names(cls, variants: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        if not variants:
            raise ValueError("at least one variant is required")
        for name in variants:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"variant name {name!r} must be letters, digits, '.', '_' or '-'")
        return variants

    @model_validator(mode="after")
    def _default_exists(self) -> JobConfig:
        if self.default_variant not in self.variants:
            raise ValueError(
                f"default_variant {self.default_variant!r} is not one of {sorted(self.variants)}"
            )
        return self


def load_config(path: str | Path | None) -> JobConfig:
    """Read and validate a YAML job config; ``None`` gives the defaults."""
    if path is None:
        return JobConfig()
    p = Path(path)
    raw = read_yaml_mapping(p, "config", ConfigError)
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(top)'}: {e['msg']}{_suggestion(e)}" for e in exc.errors()
        )
        raise ConfigError(f"config {p}: {problems}") from None


def read_yaml_mapping(path: Path, what: str, error: type[Exception]) -> dict:
    """A YAML file whose top level is a mapping (an empty file: ``{}``); ``error`` raised with
    one line naming ``what`` and the file for anything else."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{what} {path}: expected a mapping at the top level")
    return raw


def _suggestion(error) -> str:
    """For an unknown key, the known key it most likely meant (a typo more often than intent)."""
    if error.get("type") != "extra_forbidden" or not error["loc"]:
        return ""
    *parents, key = error["loc"]
    sections: dict[str, type[BaseModel]] = {"storage": StorageConfig, "output": OutputConfig,
                                            "references": ReferenceConfig, "run": RunConfig}
    model: type[BaseModel] = JobConfig
    if parents and parents[0] == "variants":
        model = VariantConfig
    elif parents:
        model = sections.get(str(parents[0]), JobConfig)
    close = difflib.get_close_matches(str(key), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(model.model_fields)})"

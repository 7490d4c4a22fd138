"""LoRA adapter files: where a variant's configured adapters are (a local file for the model
layer), and what identifies each one (for the setup digest every row it renders carries).

A source is a local ``.safetensors`` file or a directory holding one, an ``s3://`` key or prefix
(the file copied once per node into ``run.cache_dir``, under the same lock-and-marker rule as
model sources), or a Hugging Face repo id (through the Hub's cache, as ``from_pretrained``
does). In a directory, prefix or repo, ``weight_name`` names the file; unset: the only
``.safetensors`` file of a directory, ``pytorch_lora_weights.safetensors`` (what diffusers'
``save_lora_weights`` writes) in a prefix or repo.

Identity, for the driver, cheaply: a local file's sha256, an S3 object's ETag, a repo id with
its file name (the Hub is not asked which revision: name a revision-pinned copy to be exact).
A changed adapter file changes the identity, hence the setup of every row that uses it: those
rows are *outdated*, never taken as rendered with the new file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from klein_ray.assets.modelsource import REPO_ID, ModelSourceError, sync_s3_file
from klein_ray.config import AdapterConfig, ConfigError, JobConfig, StorageConfig
from klein_ray.storage import StorageError, file_sha256, open_store
from klein_ray.uris import FILE, S3, kind_of, local_path, split_s3

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class AdapterFile:
    """One adapter, ready for the model layer."""

    name: str
    path: str  # a local .safetensors file
    sha256: str
    scale: float  # the configured default (a row may give its own)


def resolve(name: str, cfg: AdapterConfig, cache_dir: str, storage: StorageConfig,
            expected: str | None = None) -> AdapterFile:
    """The adapter as a local file (downloaded once per node if remote), with its sha256.

    ``expected``: the identity the driver read when the job started, which every row's setup
    names. A file that is not that one any more (replaced since) is refused: rows rendered with
    it would carry a setup naming the other file. An S3 copy is cached per ETag, so a node never
    serves an old copy of a replaced object."""
    if expected and kind_of(cfg.source) == S3:
        now = identity(cfg, storage)
        _same(name, expected, now)
        cache_dir = str(Path(cache_dir).expanduser() / "adapters" / hashlib.sha256(now.encode()).hexdigest()[:16])
    path = _local_file(name, cfg, cache_dir, storage)
    sha256 = file_sha256(path)
    if expected and expected.startswith("sha256:"):
        _same(name, expected, f"sha256:{sha256}")
    return AdapterFile(name, str(path), sha256, cfg.scale)


def _same(name: str, expected: str, now: str) -> None:
    if now != expected:
        raise ModelSourceError(f"adapter {name!r} changed since the job started ({expected} then, {now} "
                               "now): run the job again, so that every row names the file it used")


def identity(cfg: AdapterConfig, storage: StorageConfig) -> str:
    """What identifies the adapter's weights, read cheaply from the driver (see the module)."""
    kind = kind_of(cfg.source)
    if kind == S3:
        bucket, key = split_s3(_s3_key(cfg))
        try:
            info = open_store(f"s3://{bucket}", storage).head(key)
        except StorageError as exc:
            raise ModelSourceError(f"adapter {cfg.source}: {exc}") from None
        if info is None:
            raise ModelSourceError(f"adapter {cfg.source}: s3://{bucket}/{key} does not exist")
        return f"s3:{bucket}/{key}:{info.etag}"
    if kind == FILE and Path(cfg.source).is_absolute():
        path = _in_directory(local_path(cfg.source), cfg)
        return f"sha256:{file_sha256(path)}" if path.is_file() else f"path:{path}"
    return f"hub:{cfg.source}/{cfg.weight_name or DEFAULT_WEIGHT_NAME}"


def identities(cfg: JobConfig) -> dict[str, dict[str, str]]:
    """Per variant, each LoRA adapter's identity, read once by the driver so that driver and
    workers digest the same setup (and by ``status``, to judge against the files as they are
    now); an adapter that cannot be found is a ConfigError naming it."""
    found: dict[str, dict[str, str]] = {}
    for name, vcfg in cfg.variants.items():
        found[name] = {}
        for adapter, acfg in vcfg.adapters.items():
            try:
                found[name][adapter] = identity(acfg, cfg.storage)
            except (ModelSourceError, OSError, ValueError) as exc:
                raise ConfigError(f"variant {name!r}, adapter {adapter!r}: {exc}") from None
    return found


def _local_file(name: str, cfg: AdapterConfig, cache_dir: str, storage: StorageConfig) -> Path:
    kind = kind_of(cfg.source)
    if kind == S3:
        return sync_s3_file(_s3_key(cfg), Path(cache_dir).expanduser(), storage)
    if kind == FILE and Path(cfg.source).is_absolute():
        path = _in_directory(local_path(cfg.source), cfg)
        if not path.is_file():
            raise ModelSourceError(f"adapter {name!r}: {path} is not a file")
        return path
    if REPO_ID.fullmatch(cfg.source):
        return _hub_file(name, cfg)
    raise ModelSourceError(f"adapter {name!r}: {cfg.source!r} is neither a file, a directory, an s3:// "
                           "key or prefix, nor a Hub repo id")


def _in_directory(path: Path, cfg: AdapterConfig) -> Path:
    """A directory's weight file: ``weight_name``, else its only .safetensors file."""
    if not path.is_dir():
        return path
    if cfg.weight_name:
        return path / cfg.weight_name
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise ModelSourceError(f"adapter {path}: {len(found)} .safetensors files here; name one with weight_name")
    return found[0]


def _s3_key(cfg: AdapterConfig) -> str:
    return cfg.source if cfg.source.endswith(".safetensors") else \
        f"{cfg.source.rstrip('/')}/{cfg.weight_name or DEFAULT_WEIGHT_NAME}"


def _hub_file(name: str, cfg: AdapterConfig) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=cfg.source, filename=cfg.weight_name or DEFAULT_WEIGHT_NAME))
    except Exception as exc:  # noqa: BLE001 - any way the Hub fails: the variant's load fails, named
        raise ModelSourceError(f"adapter {name!r}: {cfg.source}: {type(exc).__name__}: {exc}") from None

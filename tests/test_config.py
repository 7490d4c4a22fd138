"""The job config: defaults, YAML loading, and a ConfigError naming the field or file for each
kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from klein_ray import config as config_mod
from klein_ray.config import (
    DEFAULT_TINY_MODEL,
    ConfigError,
    JobConfig,
    OutputConfig,
    ReferenceConfig,
    RunConfig,
    StorageConfig,
    VariantConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- defaults -----------------------------------------------------------------------------


def test_defaults_are_one_tiny_variant():
    cfg = load_config(None)
    assert cfg == JobConfig()
    assert cfg.default_variant == "tiny"
    assert list(cfg.variants) == ["tiny"]
    tiny = cfg.variants["tiny"]
    assert tiny.source == DEFAULT_TINY_MODEL
    assert tiny.actors == 1 and tiny.gpus_per_actor == 0 and tiny.batch_size >= 1
    assert cfg.output.format == "png"
    assert cfg.references.max_count == 10  # SPEC: at most 10 references by default
    assert cfg.storage.max_attempts >= 1


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == JobConfig()
    assert load_config(write(tmp_path, "# only a comment\n", "c.yaml")) == JobConfig()


def test_config_is_frozen():
    cfg = JobConfig()
    with pytest.raises(ValidationError):
        cfg.default_variant = "other"  # type: ignore[misc]


# -- YAML loading -------------------------------------------------------------------------


def test_yaml_spec_example_loads(tmp_path):
    path = write(tmp_path, """
default_variant: klein-4b
variants:
  klein-4b:  {source: black-forest-labs/FLUX.2-klein-4B, actors: 2, gpus_per_actor: 1, batch_size: 4}
  klein-9b:  {source: s3://models/flux2-klein-9b/, actors: 1, gpus_per_actor: 1}
  tiny:      {source: ./.cache/tiny-klein, actors: 1, gpus_per_actor: 0}
storage: {endpoint_url: null, region: null}
output: {format: webp, webp_lossless: true, png_compress_level: 9}
references: {max_count: 3, allow_private_hosts: [10.0.0.0/8]}
run: {in_flight_per_actor: 3}
""")
    cfg = load_config(path)
    assert cfg.default_variant == "klein-4b"
    assert list(cfg.variants) == ["klein-4b", "klein-9b", "tiny"]
    assert cfg.variants["klein-4b"].actors == 2
    assert cfg.variants["klein-4b"].gpus_per_actor == 1
    assert cfg.variants["klein-9b"].source == "s3://models/flux2-klein-9b/"
    assert cfg.variants["klein-9b"].batch_size == 4  # default
    assert cfg.variants["tiny"].pipeline == "auto"
    assert cfg.storage.endpoint_url is None
    assert cfg.output.format == "webp" and cfg.output.webp_lossless is True
    assert cfg.output.png_compress_level == 9
    assert cfg.references.max_count == 3
    assert cfg.references.allow_private_hosts == ["10.0.0.0/8"]
    assert cfg.run.in_flight_per_actor == 3
    assert cfg.run.model_load_attempts == 2  # default kept


def test_shipped_demo_job_loads():
    cfg = load_config(REPO / "jobs" / "demo.yaml")
    assert cfg.default_variant in cfg.variants
    for v in cfg.variants.values():
        assert v.actors >= 1


def test_storage_endpoint_from_config_or_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert StorageConfig().resolved_endpoint() is None
    assert StorageConfig(endpoint_url="http://from-config:9000").resolved_endpoint() == "http://from-config:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-env:9000")
    assert StorageConfig().resolved_endpoint() == "http://from-env:9000"
    # Both set: the job config is the deliberate choice and wins (the environment fills in).
    assert StorageConfig(endpoint_url="http://from-config:9000").resolved_endpoint() == "http://from-config:9000"


# -- invalid configs ----------------------------------------------------------------------


INVALID = {
    "unknown top-level key": ("defualt_variant: tiny\n", ["defualt_variant"]),
    "unknown variant key": (
        "variants:\n  tiny: {source: ./m, actor: 2}\n", ["variants.tiny.actor"]),
    "unknown nested key": ("output: {fromat: png}\n", ["output.fromat"]),
    "default_variant not in variants": (
        "default_variant: big\nvariants:\n  tiny: {source: ./m}\n", ["default_variant", "big"]),
    "bad variant name": ("default_variant: a/b\nvariants:\n  a/b: {source: ./m}\n", ["variants", "a/b"]),
    "variant name with space": (
        "default_variant: 'a b'\nvariants:\n  'a b': {source: ./m}\n", ["variants", "a b"]),
    "empty variants": ("variants: {}\n", ["variants", "at least one variant"]),
    "negative actors": ("variants:\n  tiny: {source: ./m, actors: -1}\n", ["variants.tiny.actors"]),
    "zero actors": ("variants:\n  tiny: {source: ./m, actors: 0}\n", ["variants.tiny.actors"]),
    "batch too large": ("variants:\n  tiny: {source: ./m, batch_size: 1000}\n",
                        ["variants.tiny.batch_size"]),
    "negative gpus": ("variants:\n  tiny: {source: ./m, gpus_per_actor: -1}\n",
                      ["variants.tiny.gpus_per_actor"]),
    "missing source": ("variants:\n  tiny: {actors: 1}\n", ["variants.tiny.source"]),
    "unknown pipeline": ("variants:\n  tiny: {source: ./m, pipeline: turbo}\n",
                         ["variants.tiny.pipeline"]),
    "unknown format": ("output: {format: gif}\n", ["output.format"]),
    "png level above 9": ("output: {png_compress_level: 10}\n", ["output.png_compress_level"]),
    "negative png level": ("output: {png_compress_level: -1}\n", ["output.png_compress_level"]),
    "wrong type": ("run: {in_flight_per_actor: lots}\n", ["run.in_flight_per_actor"]),
    "negative timeout": ("storage: {read_timeout: -5}\n", ["storage.read_timeout"]),
    "too many attempts": ("storage: {max_attempts: 100}\n", ["storage.max_attempts"]),
}


@pytest.mark.parametrize("text, needles", INVALID.values(), ids=list(INVALID))
def test_invalid_config_raises_config_error_naming_the_field(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_config_error_lists_every_problem(tmp_path):
    path = write(tmp_path, "bogus: 1\nvariants:\n  tiny: {source: ./m, actors: -1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "bogus" in message and "variants.tiny.actors" in message


@pytest.mark.parametrize("text", [
    "variants: [unclosed\n",
    "a: b: c\n",
    "key: 'unterminated\n",
    "\tindented: with a tab\n",
], ids=["unclosed-flow", "nested-colon", "unterminated-quote", "tab"])
def test_bad_yaml_raises_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"],
                         ids=["list", "string", "number"])
def test_non_mapping_raises_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


def test_missing_file_raises_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_config_error_is_a_value_error():
    # The CLI maps it to exit code 2; other callers may catch ValueError.
    assert issubclass(ConfigError, ValueError)


# -- documentation ------------------------------------------------------------------------


def _config_models() -> list[type[BaseModel]]:
    found = [
        obj for obj in vars(config_mod).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == config_mod.__name__
        and obj.model_fields
    ]
    return found


def test_every_config_model_is_found():
    models = set(_config_models())
    assert {JobConfig, VariantConfig, StorageConfig, OutputConfig, ReferenceConfig, RunConfig} <= models


@pytest.mark.parametrize("model", _config_models(), ids=lambda m: m.__name__)
def test_every_field_has_a_description(model):
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no description"
        assert len(field.description) >= 10, f"{model.__name__}.{name}: {field.description!r} is too short"


@pytest.mark.parametrize("model", _config_models(), ids=lambda m: m.__name__)
def test_every_model_rejects_unknown_keys(model):
    assert model.model_config.get("extra") == "forbid"


# -- a variant's single-file transformer ----------------------------------------------------


def test_transformer_file_is_made_absolute_and_remote_ones_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "variants:\n  q:\n    source: black-forest-labs/FLUX.2-klein-4B\n"
                           "    transformer: weights/flux-2-klein-4b-fp8.safetensors\n"
                           "default_variant: q\n")
    q = load_config(path).variants["q"]
    assert q.transformer == str(tmp_path / "weights" / "flux-2-klein-4b-fp8.safetensors")
    assert VariantConfig(source="a/b").transformer is None
    for ref in ("s3://models/klein/flux-2-klein-4b-nvfp4.safetensors",
                "hf://black-forest-labs/FLUX.2-klein-4b-fp8/flux-2-klein-4b-fp8.safetensors"):
        assert VariantConfig(source="a/b", transformer=ref).transformer == ref
    uri = VariantConfig(source="a/b", transformer="file:///w/a%20b.safetensors").transformer
    assert uri == "/w/a b.safetensors"


@pytest.mark.parametrize("ref, needle", [
    ("weights.ckpt", ".safetensors"), ("s3://only-bucket.safetensors", "s3://bucket/key"),
    ("hf://org/file.safetensors", "hf://org/repo/file"), ("https://h/f.safetensors", "s3:// or hf://"),
    ("file://remote/f.safetensors", "remote host"), ("", ".safetensors"),
])
def test_bad_transformer_file_is_a_config_error(tmp_path, ref, needle):
    path = write(tmp_path, f"variants:\n  q: {{source: a/b, transformer: '{ref}'}}\ndefault_variant: q\n")
    with pytest.raises(ConfigError, match="variants.q.transformer") as info:
        load_config(path)
    assert needle in str(info.value)

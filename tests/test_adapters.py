"""LoRA adapters: declared on a variant, loaded once per worker, chosen per row, batched by
adapter set. Rows with no adapter, one, two and a scaled one in one job each render what
diffusers' own pipeline with the same adapters loaded renders (within 2/255 on the tiny model);
a changed adapter file changes the rows' setup (outdated, never taken as rendered with it) and
the image fingerprint; each per-row mistake is a validate error; an adapter for another model
fails its variant's load naming the file, and the other variants go on."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from localrun import manifest, render
from PIL import Image

from klein_ray.commands.status import output_status
from klein_ray.config import AdapterConfig, JobConfig, RunConfig, VariantConfig
from klein_ray.intake.rows import RowValidator
from klein_ray.model.tiny import make_tiny_lora
from klein_ray.output.layout import meta_key
from klein_ray.storage import LocalStore
from klein_ray.worker.render import RenderWorker


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_tiny_lora(tiny_models["tiny"], root / name, seed=seed)
            for name, seed in (("brand", 1), ("product", 2))}


def _config(tiny_models, loras, **variant) -> JobConfig:
    adapters = {"brand": AdapterConfig(source=str(loras["brand"])),
                "product": AdapterConfig(source=str(loras["product"]), scale=0.8)}
    return JobConfig(default_variant="tiny", run=RunConfig(in_flight_per_actor=2), variants={
        "tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled", batch_size=2,
                              adapters=adapters, **variant)})


ROWS = [  # two rows per adapter set, so each set is one batch of two
    {"id": "plain-0", "prompt": "a mug", "seed": 1},
    {"id": "plain-1", "prompt": "a lamp", "seed": 2},
    {"id": "brand-0", "prompt": "a mug", "seed": 1, "adapters": ["brand"]},
    {"id": "brand-1", "prompt": "a lamp", "seed": 2, "adapters": ["brand"]},
    {"id": "both-0", "prompt": "a mug", "seed": 1, "adapters": ["brand", "product"]},
    {"id": "both-1", "prompt": "a lamp", "seed": 2, "adapters": ["product", "brand"], "adapter_scales": [0.8, 1.0]},
    {"id": "half-0", "prompt": "a mug", "seed": 1, "adapters": ["brand"], "adapter_scales": [0.5]},
    {"id": "half-1", "prompt": "a lamp", "seed": 2, "adapters": ["brand"], "adapter_scales": [0.5]},
]


def _direct(tiny_models, loras, row: dict) -> np.ndarray:
    """diffusers' own pipeline, the row's adapters loaded and set, called for the row alone."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_models["tiny"]))
    names = row.get("adapters") or []
    scales = row.get("adapter_scales") or [{"brand": 1.0, "product": 0.8}[n] for n in names]
    for name in names:
        pipe.load_lora_weights(str(loras[name]), adapter_name=name)
    if names:
        pipe.set_adapters(names, scales)
    image = pipe(prompt=row["prompt"], height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator("cpu").manual_seed(row["seed"])).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow  # diffusers' own pipeline, loaded per row: the reference, not the tool
def test_the_tiny_lora_loads_in_diffusers_and_changes_images_plainly(tiny_models, loras):
    plain = _direct(tiny_models, loras, ROWS[0])
    adapted = _direct(tiny_models, loras, ROWS[2])
    assert np.abs(plain - adapted).mean() >= 10  # tens of levels, not a rounding difference


@pytest.mark.slow
def test_rows_choose_their_adapters_and_render_what_diffusers_renders(tmp_path, tiny_models, loras):
    out = tmp_path / "out"
    uri = manifest(tmp_path / "m.parquet", [dict(r, width=64, height=64) for r in ROWS])
    summary, code = render(uri, str(out), _config(tiny_models, loras), factory=RenderWorker.load)
    assert code == 0 and summary["committed"] == len(ROWS)
    store = LocalStore(out)
    for row in ROWS:
        meta = json.loads(store.get(meta_key(row["id"])))
        ours = np.asarray(Image.open(io.BytesIO(store.get(meta["image"]["key"]))).convert("RGB"), dtype=np.int16)
        assert np.abs(ours - _direct(tiny_models, loras, row)).max() <= 2, row["id"]
        assert sorted(meta["batch"]["ids"]) == sorted(r["id"] for r in ROWS if r["id"][:-1] == row["id"][:-1])
        used = {a["name"]: a["scale"] for a in meta["adapters"]}
        expected = dict(zip(row.get("adapters") or [], row.get("adapter_scales") or
                            [{"brand": 1.0, "product": 0.8}[n] for n in row.get("adapters") or []]))
        assert used == expected and all(len(a["sha256"]) == 64 for a in meta["adapters"])


def test_always_adapters_are_fused_into_every_row(tmp_path, tiny_models, loras):
    out = tmp_path / "out"
    rows = [dict(ROWS[0], width=64, height=64), dict(ROWS[6], width=64, height=64, adapters=["product"],
                                                      adapter_scales=[0.5])]
    uri = manifest(tmp_path / "m.parquet", rows)
    summary, code = render(uri, str(out), _config(tiny_models, loras, always=["brand"]), factory=RenderWorker.load)
    assert code == 0
    store = LocalStore(out)
    first = json.loads(store.get(meta_key("plain-0")))
    ours = np.asarray(Image.open(io.BytesIO(store.get(first["image"]["key"]))).convert("RGB"), dtype=np.int16)
    assert np.abs(ours - _direct(tiny_models, loras, ROWS[2])).max() <= 2  # as if it named brand
    assert [a["name"] for a in first["adapters"]] == ["brand"] and first["adapters"][0]["always"]


def test_a_changed_adapter_file_makes_its_rows_outdated_and_changes_the_fingerprint(tmp_path, tiny_models, loras):
    import shutil

    lora = tmp_path / "brand"
    shutil.copytree(loras["brand"], lora)
    config = _config(tiny_models, {**loras, "brand": lora})
    out = tmp_path / "out"
    uri = manifest(tmp_path / "m.parquet", [dict(r, width=64, height=64) for r in ROWS[:4]])
    assert render(uri, str(out), config, factory=RenderWorker.load)[1] == 0
    before = json.loads(LocalStore(out).get(meta_key("brand-0")))
    make_tiny_lora(tiny_models["tiny"], lora, seed=7)  # the brand's adapter, retrained
    st = output_status(str(out))
    assert (st.committed, st.outdated) == (4, 2)  # the brand rows; the plain ones are current
    summary, code = render(uri, str(out), config, factory=RenderWorker.load, rerender_outdated=True)
    assert code == 0 and summary["committed"] == 2
    after = json.loads(LocalStore(out).get(meta_key("brand-0")))
    assert after["adapters"][0]["sha256"] != before["adapters"][0]["sha256"]
    assert after["image"]["sha256"] != before["image"]["sha256"]


@pytest.mark.parametrize("raw, column, needle", [
    ({"adapters": ["brnad"]}, "adapters", "did you mean 'brand'"),
    ({"adapters": ["brand", "brand"]}, "adapters", "named twice"),
    ({"adapters": ["brand"], "adapter_scales": [0.5, 1.0]}, "adapter_scales", "give one per adapter"),
    ({"adapters": ["brand"], "adapter_scales": [float("nan")]}, "adapter_scales", "finite"),
    ({"adapter_scales": [1.0]}, "adapter_scales", "without adapters"),
    ({"adapters": "brand"}, "adapters", "a list"),
])
def test_each_adapter_mistake_is_a_row_error_at_validate(tiny_models, loras, raw, column, needle):
    validator = RowValidator(_config(tiny_models, loras))
    errors = validator.validate(dict({"id": "r", "prompt": "p"}, **raw), "m.parquet", 0)
    assert isinstance(errors, list) and errors[0].column == column and needle in errors[0].message
    assert errors[0].stage == "validate"


def test_an_adapter_for_another_model_fails_its_variant_naming_the_file(tmp_path, tiny_models, loras):
    from safetensors.torch import load_file, save_file

    alien = tmp_path / "alien"
    alien.mkdir()
    weights = {k: (v[:, :-1].contiguous() if ".lora_A." in k else v) for k, v in
               load_file(str(loras["brand"] / "pytorch_lora_weights.safetensors")).items()}
    save_file(weights, str(alien / "alien.safetensors"))  # every layer one input short
    config = _config(tiny_models, {**loras, "brand": alien})
    config = config.model_copy(update={"variants": {**config.variants, "plain": VariantConfig(
        source=str(tiny_models["tiny"]), pipeline="distilled")}})
    uri = manifest(tmp_path / "m.parquet", [dict(ROWS[0], width=64, height=64),
                                            dict(ROWS[1], width=64, height=64, variant="plain")])
    summary, code = render(uri, str(tmp_path / "out"), config, factory=RenderWorker.load)
    assert code == 1 and summary["committed"] == 1  # the other variant went on
    (error,) = pq.ParquetFile(tmp_path / "out" / "_job" / "errors.parquet").read().to_pylist()
    assert error["error_type"] == "ModelLoadError" and "alien.safetensors" in error["message"]
    assert re.search(r"layer '[a-z_]*blocks\.0\.attn\.[a-z_]*' is 31 -> \d+ in the file, 32 -> ", error["message"])


def test_a_file_replaced_after_the_job_started_is_refused_not_rendered_under_the_old_name(tmp_path, loras):
    """The driver read the adapter's identity; the file is replaced before a worker loads it:
    the worker refuses it (rows would carry a setup naming the other file)."""
    from klein_ray.assets import adapters as adapter_files
    from klein_ray.assets.modelsource import ModelSourceError
    from klein_ray.config import StorageConfig

    local = tmp_path / "mug"
    local.mkdir()
    weights = local / "pytorch_lora_weights.safetensors"
    weights.write_bytes((loras["brand"] / "pytorch_lora_weights.safetensors").read_bytes())
    cfg = AdapterConfig(source=str(local))
    known = adapter_files.identity(cfg, StorageConfig())
    assert adapter_files.resolve("mug", cfg, str(tmp_path / "cache"), StorageConfig(), known).sha256 == known[7:]
    weights.write_bytes((loras["product"] / "pytorch_lora_weights.safetensors").read_bytes())
    with pytest.raises(ModelSourceError, match="adapter 'mug' changed since the job started"):
        adapter_files.resolve("mug", cfg, str(tmp_path / "cache"), StorageConfig(), known)


def test_an_s3_adapter_is_cached_per_version_and_a_replaced_object_is_refused(tmp_path, loras, moto_s3, s3_env):
    from klein_ray.assets import adapters as adapter_files
    from klein_ray.assets.modelsource import ModelSourceError
    from klein_ray.config import StorageConfig

    server = s3_env(moto_s3)
    bucket, client = server.new_bucket(), server.client()
    first, second = (loras[n] / "pytorch_lora_weights.safetensors" for n in ("brand", "product"))
    client.put_object(Bucket=bucket, Key="loras/mug/pytorch_lora_weights.safetensors", Body=first.read_bytes())
    cfg, storage, cache = AdapterConfig(source=f"s3://{bucket}/loras/mug/"), StorageConfig(), str(tmp_path / "cache")
    old = adapter_files.identity(cfg, storage)
    assert Path(adapter_files.resolve("mug", cfg, cache, storage, old).path).read_bytes() == first.read_bytes()

    client.put_object(Bucket=bucket, Key="loras/mug/pytorch_lora_weights.safetensors", Body=second.read_bytes())
    with pytest.raises(ModelSourceError, match="changed since the job started"):
        adapter_files.resolve("mug", cfg, cache, storage, old)  # a job that started before the swap
    new = adapter_files.identity(cfg, storage)
    got = adapter_files.resolve("mug", cfg, cache, storage, new)  # the next job: the new file, not the node's old copy
    assert new != old and Path(got.path).read_bytes() == second.read_bytes()

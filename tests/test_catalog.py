"""`klein-ray expand`: a catalog's products x scenes x seeds as a manifest. The cross product and
its order, typed columns, seeds (a count, a list, a template), size presets, `when`, dropped
references, byte-identical re-expansion, the products table as CSV, Parquet or JSONL, and the
manifest reading back through the manifest reader and row validator as `render` reads it. The
strict errors and the sandbox: test_catalog_errors.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from catalogs import PRODUCTS, edit_catalog, expand, read, write_catalog

from klein_ray.config import JobConfig
from klein_ray.intake.catalog.writer import ROW_GROUP_ROWS
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.rows import RowValidator, derive_seed
from klein_ray.types import RowSpec


def test_the_minimum_catalog_is_the_cross_product_in_order(tmp_path, capsys):
    catalog = write_catalog(tmp_path)
    code, out, err = expand(capsys, catalog, tmp_path / "m.parquet")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["rows"], summary["products"], summary["scenes"], summary["seeds"]) == (12, 3, 2, 2)
    rows = read(tmp_path / "m.parquet")
    assert [r["id"] for r in rows] == [f"{p}-{s}-{k}" for p in ("A-1", "B-2", "C-3")
                                       for s in ("marble", "beach") for k in (0, 1)]
    first = rows[0]
    assert first["prompt"] == "red mug, on a white marble table, soft window light"
    assert first["references"] == [(tmp_path / "photos" / "a.png").as_uri()]  # from the catalog's directory
    assert [r["seed"] for r in rows] == [derive_seed(r["id"]) for r in rows]
    assert len({r["seed"] for r in rows}) == 12
    # C-3 has no photo: its reference is dropped and the row is text-to-image.
    assert all(r["references"] is None for r in rows if r["id"].startswith("C-3"))
    assert all(r[c] is None for r in rows for c in ("variant", "width", "height", "steps", "guidance", "format"))


def test_the_manifest_reads_back_as_render_reads_it(tmp_path, capsys):
    catalog = write_catalog(tmp_path, columns={"sku": "{{ product.sku }}", "scene": "{{ scene.name }}",
                                               "seed_index": {"value": "{{ seed }}", "type": "int"},
                                               "campaign": "spring", "priority": 3})
    assert expand(capsys, catalog, tmp_path / "m.parquet")[0] == 0
    validator = RowValidator(JobConfig(), tmp_path)
    with Manifest(str(tmp_path / "m.parquet")) as manifest:
        schema = pq.ParquetFile(tmp_path / "m.parquet").schema_arrow
        assert schema.field("seed_index").type == pa.int64() and schema.field("priority").type == pa.int64()
        specs = [validator.validate(raw, mf.name, i) for mf, i, raw in manifest.iter_rows()]
    assert all(isinstance(s, RowSpec) for s in specs), specs
    assert specs[5].passthrough == {"sku": "B-2", "scene": "marble", "seed_index": 1, "campaign": "spring",
                                    "priority": 3}
    assert specs[5].seed_source == "manifest"


def test_seeds_as_a_list_are_the_rows_seeds_and_a_seed_template_wins(tmp_path, capsys):
    catalog = write_catalog(tmp_path, seeds=[7, 42], id="{{ product.sku }}-{{ scene.name }}-s{{ seed_value }}")
    assert expand(capsys, catalog, tmp_path / "m.parquet")[0] == 0
    rows = read(tmp_path / "m.parquet")
    assert [r["seed"] for r in rows[:4]] == [7, 42, 7, 42] and rows[1]["id"] == "A-1-marble-s42"

    catalog = write_catalog(tmp_path, seed="{{ 1000 * product_index + 10 * scene_index + seed }}")
    assert expand(capsys, catalog, tmp_path / "m2.parquet")[0] == 0
    assert [r["seed"] for r in read(tmp_path / "m2.parquet")][-4:] == [2000, 2001, 2010, 2011]


def test_size_presets_when_vars_and_typed_columns(tmp_path, capsys):
    catalog = write_catalog(
        tmp_path, seeds=1,
        scenes=[{"name": "marble", "prompt": "on marble", "size": "square"},
                {"name": "beach", "prompt": "on sand", "size": "portrait"},
                {"name": "studio", "prompt": "in a studio"}],
        sizes={"square": [1024, 1024], "portrait": [768, 1024], "small": [512, 512]},
        size="{{ scene.size | default(vars.size) }}", vars={"size": "small", "brand": "ACME"},
        when="scene.name != 'beach' or product.sku == 'A-1'",
        seed="{{ 1 if scene.name != 'beach' or product.sku == 'A-1' else -1 }}",  # -1: never rendered
        prompt="{{ vars.brand }} {{ product.title }}, {{ scene.prompt }}",
        steps="{{ 4 if scene.name == 'studio' else 8 }}", format="jpeg",
        adapters=["{{ 'brand-style' }}", "{{ product.photo and 'product-lock' }}"],
    )
    assert expand(capsys, catalog, tmp_path / "m.parquet")[0] == 0
    rows = {r["id"]: r for r in read(tmp_path / "m.parquet")}
    assert sorted(rows) == ["A-1-beach-0", "A-1-marble-0", "A-1-studio-0", "B-2-marble-0", "B-2-studio-0",
                            "C-3-marble-0", "C-3-studio-0"]  # `when` keeps the beach for A-1 only
    assert (rows["A-1-beach-0"]["width"], rows["A-1-beach-0"]["height"]) == (768, 1024)
    assert (rows["B-2-studio-0"]["width"], rows["B-2-studio-0"]["height"], rows["B-2-studio-0"]["steps"]) == (512, 512, 4)
    assert rows["A-1-marble-0"]["prompt"] == "ACME red mug, on marble" and rows["A-1-marble-0"]["format"] == "jpeg"
    assert rows["A-1-marble-0"]["adapters"] == ["brand-style", "product-lock"]
    assert rows["C-3-marble-0"]["adapters"] == ["brand-style"]  # the empty one dropped


def test_re_expansion_is_byte_identical(tmp_path, capsys):
    catalog = write_catalog(tmp_path, columns={"sku": "{{ product.sku }}", "n": 1})
    assert expand(capsys, catalog, tmp_path / "one.parquet")[0] == 0
    assert expand(capsys, catalog, tmp_path / "two.parquet")[0] == 0
    one, two = (tmp_path / "one.parquet").read_bytes(), (tmp_path / "two.parquet").read_bytes()
    assert one == two
    assert set(pq.ParquetFile(tmp_path / "one.parquet").metadata.metadata) == {b"ARROW:schema"}  # no dates


@pytest.mark.slow
def test_a_large_expansion_is_byte_identical_in_fixed_row_groups(tmp_path, capsys):
    products = "sku,title,photo\n" + "".join(f"P{i:05d},item {i},photos/{i}.png\n" for i in range(40_000))
    catalog = write_catalog(tmp_path, products=products, seeds=2)
    assert expand(capsys, catalog, tmp_path / "one.parquet")[0] == 0
    assert expand(capsys, catalog, tmp_path / "two.parquet")[0] == 0
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    meta = pq.ParquetFile(tmp_path / "one.parquet").metadata
    assert meta.num_rows == 160_000
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS,
                                                                              160_000 - 2 * ROW_GROUP_ROWS]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parquet_and_jsonl_products_keep_their_types(tmp_path, capsys, fmt):
    products = [{"sku": "A-1", "title": "red mug", "price": 12.5, "photo": "photos/a.png"},
                {"sku": "B-2", "title": "blue lamp", "price": 30.0, "photo": None}]
    name = f"products.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(products), tmp_path / name)
    else:
        (tmp_path / name).write_text("".join(json.dumps(p) + "\n" for p in products))
    catalog = write_catalog(tmp_path, products="", name=name,
                            prompt="{{ product.title }} for {{ '%.2f' | format(product.price * 2) }}", seeds=1)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(products), tmp_path / name)  # write_catalog wrote text over it
    else:
        (tmp_path / name).write_text("".join(json.dumps(p) + "\n" for p in products))
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet")
    assert code == 0, err
    rows = read(tmp_path / "m.parquet")
    assert rows[0]["prompt"] == "red mug for 25.00"
    assert rows[2]["references"] is None  # a null photo renders empty: the reference is dropped


def test_product_values_are_data_never_templates(tmp_path, capsys):
    catalog = write_catalog(tmp_path, products="sku,title,photo\nX-1,{{ 7*7 }} {% if 1 %}mug{% endif %},\n",
                            seeds=1, scenes=None, id="{{ product.sku }}", prompt="{{ product.title }}")
    assert expand(capsys, catalog, tmp_path / "m.parquet")[0] == 0
    (row,) = read(tmp_path / "m.parquet")
    assert row["prompt"] == "{{ 7*7 }} {% if 1 %}mug{% endif %}"


def test_csv_values_are_text_and_columns_named_like_dict_methods_work(tmp_path, capsys):
    catalog = write_catalog(tmp_path, products="sku,items,values\n00123,3 cups,blue\n", seeds=1, scenes=None,
                            id="sku-{{ product.sku }}", prompt="{{ product.items }} in {{ product['values'] }}",
                            references=None)
    assert expand(capsys, catalog, tmp_path / "m.parquet")[0] == 0
    (row,) = read(tmp_path / "m.parquet")
    assert row["id"] == "sku-00123" and row["prompt"] == "3 cups in blue"


def test_guidance_on_a_distilled_variant_is_warned_with_the_job_config(tmp_path, capsys):
    config = tmp_path / "job.yaml"  # (expand reads the variants' settings, never their models)
    config.write_text(yaml.safe_dump({"default_variant": "fast", "variants": {
        "fast": {"source": "/models/klein-4b", "pipeline": "distilled"},
        "base": {"source": "/models/klein-base-4b", "pipeline": "base"}}}))
    catalog = write_catalog(tmp_path, guidance=3.5, variant="{{ 'base' if scene.name == 'beach' else '' }}")
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet", "--config", str(config))
    assert code == 0, err
    assert "guidance is set on 6 row(s) of variant 'fast', which is distilled" in err
    assert "'base'" not in err
    # Without the config nothing is known of the variants: no warning.
    assert "guidance" not in expand(capsys, catalog, tmp_path / "m2.parquet")[2]


def test_references_render_would_refuse_are_warned(tmp_path, capsys):
    catalog = write_catalog(tmp_path, references=["/elsewhere/{{ product.sku }}.png", "{{ product.photo }}"])
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet")
    assert code == 0
    assert "3 distinct reference(s) would be refused by `render`" in err and "references.local_roots" in err


def test_products_from_s3_and_the_manifest_to_s3(tmp_path, capsys, moto_s3, s3_env):
    s3_env(moto_s3)
    bucket = moto_s3.new_bucket()
    client = moto_s3.client()
    client.put_object(Bucket=bucket, Key="tables/products.csv", Body=PRODUCTS.encode())
    catalog = edit_catalog(write_catalog(tmp_path, references=["s3://{{ 'photos' }}/{{ product.sku }}.png"]),
                           products=f"s3://{bucket}/tables/products.csv")
    code, out, err = expand(capsys, catalog, f"s3://{bucket}/manifests/m.parquet")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["manifest"] == f"s3://{bucket}/manifests/m.parquet"
    body = client.get_object(Bucket=bucket, Key="manifests/m.parquet")["Body"].read()
    rows = pq.ParquetFile(pa.BufferReader(body)).read().to_pylist()
    assert len(rows) == 12 and rows[0]["references"] == ["s3://photos/A-1.png"]
    assert "bucket 'photos', outside references.s3_buckets" in err  # render would refuse them: warned

    # A failed expansion to S3 puts nothing there.
    bad = edit_catalog(catalog, id="{{ product.sku }}")
    assert expand(capsys, bad, f"s3://{bucket}/manifests/bad.parquet")[0] == 2
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="manifests/")["Contents"]] == \
        ["manifests/m.parquet"]


def test_text_and_variable_templates_render_as_jinja_renders_them():
    """Templates of text and variables only skip Jinja's machinery: the same text either way."""
    from klein_ray.intake.catalog.templates import Columns, Compiler

    compiler = Compiler()
    context = compiler.context({"vars": Columns({"brand": "ACME"}, "vars"), "seed": 3, "seed_value": 7,
                                "product": Columns({"sku": "A-1", "price": 12.5, "none": None, "n": 0,
                                                    "tags": ["a", "b"]}, "product", "column"),
                                "scene": Columns({"name": "marble"}, "scene 0"), "product_index": 4,
                                "scene_index": 0})
    for source in ["{{ product.sku }}-{{ scene.name }}-{{ seed }}", " {{ vars.brand }} {{ product['price'] }} ",
                   "{{ product.none }}|{{ product.n }}|{{ product.tags }}|{{ seed_value }}{{ product_index }}",
                   "{{ product }}", "no {{ scene['name'] }} here\n"]:
        template = compiler.template("k", source)
        assert template.simple is not None, source
        assert template.render(context) == template.compiled.render(context).strip(), source
    assert compiler.template("k", "{{ product.sku | lower }}").simple is None

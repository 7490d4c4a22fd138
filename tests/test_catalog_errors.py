"""`klein-ray expand` is strict: every problem is exit 2 with one line naming the catalog key, the
product row (file, row number, first column's value) and the reason, and no manifest is written
(one already at the destination is left as it was). The sandbox refuses Python internals."""

from __future__ import annotations

import pytest
import yaml
from catalogs import edit_catalog, expand, write_catalog

PRODUCTS_DUP = "sku,title,photo\nA-1,red mug,a.png\nB-2,blue lamp,b.png\nA-1,red mug again,c.png\n"

# name -> (catalog changes, products CSV or None, what the message must say)
CASES = {
    "unknown variable": ({"id": "{{ produkt.sku }}-{{ seed }}"}, None,
                         ["'id'", "unknown variable 'produkt'", "product, product_index, scene"]),
    "unknown product column": ({"prompt": "{{ product.titel }}"}, None,
                               ["'prompt'", "product.titel", "products.csv has no column 'titel'",
                                "sku, title, photo"]),
    "scene key missing in one scene": (
        {"scenes": [{"name": "marble", "light": "soft"}, {"name": "beach"}],
         "prompt": "{{ product.title }} in {{ scene.light }} light"}, None,
        ["'prompt'", "products.csv row 1 (sku 'A-1')", "scene 1 ('beach')", "has no key 'light'"]),
    "duplicate id": ({"id": "{{ product.sku }}-{{ scene.name }}-{{ seed }}"}, PRODUCTS_DUP,
                     ["'id'", "duplicate id 'A-1-marble-0'", "products.csv row 3 (sku 'A-1')",
                      "products.csv row 1 (sku 'A-1')", "scene 0 ('marble')", "seed 0"]),
    "id outside the id rules": ({"id": "{{ product.title }}-{{ seed }}"}, None,
                                ["'id'", "products.csv row 1 (sku 'A-1')", "seed 0", "'red mug-0'",
                                 "must match"]),
    "id too long": ({"id": "{{ product.sku * 50 }}-{{ seed }}"}, None,
                    ["'id'", "products.csv row 1", "characters, at most 128"]),
    "width not a multiple of 16": ({"width": "{{ 1000 if product.sku == 'B-2' else 1024 }}", "height": 1024},
                                   None, ["'width'", "products.csv row 2 (sku 'B-2')",
                                          "multiple of 16 in [64, 2048], got 1000"]),
    "plain height out of bounds": ({"height": 4096}, None, ["'height': height must", "got 4096"]),
    "size preset off the grid": ({"sizes": {"odd": [1000, 1000]}, "size": "odd"}, None,
                                 ["sizes.odd", "1000x1000", "multiples of 16"]),
    "unknown size preset": ({"sizes": {"square": [1024, 1024]}, "size": "{{ scene.name }}"}, None,
                            ["'size'", "scene 0 ('marble')", "'marble' is not one of the catalog's sizes"]),
    "reference not a URI the manifest accepts": ({"references": ["ftp://photos/{{ product.photo }}"]}, None,
                                                 ["'references[0]'", "products.csv row 1 (sku 'A-1')",
                                                  "unsupported reference scheme 'ftp'"]),
    "too many references": ({"references": ["{{ product.photo }}"] * 11}, None,
                            ["'references'", "11 references, at most 10"]),
    "seed out of range": ({"seed": "{{ -1 - seed }}"}, None, ["'seed'", "seed 0", "[0, 2^63-1], got -1"]),
    "steps not an integer": ({"steps": "{{ product.title }}"}, None, ["'steps'", "must be an integer, got 'red mug'"]),
    "unknown format": ({"format": "gif"}, None, ["'format'", "unknown format 'gif'"]),
    "template syntax": ({"prompt": "{{ product.title "}, None, ["'prompt'", "syntax error"]),
    "unknown filter": ({"prompt": "{{ product.title | random }}"}, None, ["'prompt'", "No filter named 'random'"]),
    "unknown key": ({"promtp": "x"}, None, ["promtp", "Extra inputs are not permitted"]),
    "products table missing": ({"products": "nowhere.csv"}, None, ["products", "nowhere.csv", "not found"]),
    "ragged csv row": ({}, "sku,title,photo\nA-1,red mug\n", ["products.csv row 1", "2 values, the header has 3"]),
    "empty products": ({}, "sku,title,photo\n", ["expands to no rows"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_strict_error_is_exit_2_naming_key_row_and_reason_and_writes_nothing(tmp_path, capsys, case):
    changes, products, expected = CASES[case]
    catalog = edit_catalog(write_catalog(tmp_path, **({"products": products} if products else {})), **changes)
    dest = tmp_path / "m.parquet"
    dest.write_bytes(b"the manifest of yesterday")
    code, out, err = expand(capsys, catalog, dest)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("klein-ray: "), err  # one line, no traceback
    for part in expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert dest.read_bytes() == b"the manifest of yesterday"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".parquet"] == ["m.parquet"]


def test_an_unknown_variant_is_an_error_with_the_job_config(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"default_variant": "fast", "variants": {"fast": {"source": "/models/x"}}}))
    catalog = write_catalog(tmp_path, variant="{{ 'slow' if scene.name == 'beach' else 'fast' }}")
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet", "--config", str(config))
    assert code == 2 and "'variant'" in err and "scene 1 ('beach')" in err and "unknown variant 'slow'" in err
    assert not (tmp_path / "m.parquet").exists()


INTERNALS = [
    "{{ product.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ product['__class__'] }}",
    "{{ namespace.__init__.__globals__['os'] }}",
    "{{ (product.sku).__class__.__base__.__subclasses__() }}",
    "{{ 'x' * 1000000 }}",
]


@pytest.mark.parametrize("template", INTERNALS)
def test_the_sandbox_refuses_python_internals(tmp_path, capsys, template):
    catalog = write_catalog(tmp_path, prompt=template)
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet")
    assert code == 2, err
    assert "'prompt'" in err and "refused by the sandbox" in err, err
    assert "Traceback" not in err and not (tmp_path / "m.parquet").exists()



def test_a_jsonl_row_without_a_column_is_named_by_its_line(tmp_path, capsys):
    lines = ['{"sku": "A-1", "title": "red mug", "photo": "a.png"}', "",
             '{"sku": "B-2", "photo": "b.png"}']
    catalog = write_catalog(tmp_path, products="\n".join(lines) + "\n", name="products.jsonl")
    code, _, err = expand(capsys, catalog, tmp_path / "m.parquet")
    assert code == 2
    assert "'prompt' for products.jsonl line 3 (sku 'B-2'), scene 0 ('marble')" in err
    assert "product has no column 'title' (it has: photo, sku)" in err
    assert not (tmp_path / "m.parquet").exists()

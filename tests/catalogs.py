"""Catalogs for the tests: a small products CSV, the issue's minimum catalog, writing variations
of it and running `klein-ray expand` in-process.

Not a test module: test_catalog*.py and test_review_loop.py import from here.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import yaml

from klein_ray.cli import main

PRODUCTS = "sku,title,photo\nA-1,red mug,photos/a.png\nB-2,blue lamp,photos/b.png\nC-3,green chair,\n"
MINIMUM = {
    "products": "products.csv",
    "scenes": [{"name": "marble", "prompt": "on a white marble table, soft window light"},
               {"name": "beach", "prompt": "on sand at golden hour"}],
    "seeds": 2,
    "id": "{{ product.sku }}-{{ scene.name }}-{{ seed }}",
    "prompt": "{{ product.title }}, {{ scene.prompt }}",
    "references": ["{{ product.photo }}"],
}


def write_catalog(tmp_path: Path, products: str = PRODUCTS, name: str = "products.csv", **changes) -> Path:
    (tmp_path / name).write_text(products, encoding="utf-8")
    catalog = {**MINIMUM, "products": name, **changes}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in catalog.items() if v is not None}, sort_keys=False))
    return path


def edit_catalog(path: Path, **changes) -> Path:
    """Set keys of a written catalog (``products`` too: write_catalog's takes the CSV's text)."""
    raw = yaml.safe_load(path.read_text())
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def expand(capsys, catalog: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["expand", str(catalog), "--output", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path: Path) -> list[dict]:
    return pq.ParquetFile(path).read().to_pylist()

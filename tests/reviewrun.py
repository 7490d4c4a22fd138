"""A catalog run for the review-loop tests: product photos, a products CSV and a catalog of
reference edits, expanded and rendered on the tiny model (in-process, ``localrun``).

Not a test module: test_review_loop.py and test_review_browser.py import from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from localrun import job, render
from PIL import Image, ImageDraw

from klein_ray.cli import main
from klein_ray.config import ReportConfig

# sku -> (title, photo colour); the lamp has no photo: its rows are text-to-image.
PRODUCTS = {"MUG-1": ("red ceramic mug", (200, 40, 40)), "VASE-2": ("blue glass vase", (40, 60, 200)),
            "LAMP-3": ("walnut desk lamp", None)}
SCENES = [{"name": "marble", "prompt": "on a white marble table"}, {"name": "beach", "prompt": "on sand"}]


@dataclass
class CatalogRun:
    root: Path
    manifest: Path
    out: Path
    rows: list[dict]  # the expanded manifest's rows
    photo_sha: dict[str, str]  # sku -> its photo's sha256
    summary: dict
    code: int


def photo(path: Path, colour: tuple[int, int, int]) -> None:
    im = Image.new("RGB", (96, 80), (235, 235, 230))
    ImageDraw.Draw(im).ellipse((20, 12, 76, 68), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def catalog_run(tmp_path: Path, tiny_models, group_by: str | None = None, seeds: int = 1) -> CatalogRun:
    """Expand the catalog (through the CLI, in-process) and render it."""
    lines, shas = ["sku,title,photo"], {}
    for sku, (title, colour) in PRODUCTS.items():
        name = ""
        if colour is not None:
            name = f"photos/{sku.lower()}.png"
            photo(tmp_path / name, colour)
            shas[sku] = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        lines.append(f"{sku},{title},{name}")
    (tmp_path / "products.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump({
        "products": "products.csv", "scenes": SCENES, "seeds": seeds,
        "id": "{{ product.sku }}-{{ scene.name }}-{{ seed }}",
        "prompt": "{{ product.title }}, {{ scene.prompt }}",
        "references": ["{{ product.photo }}"], "width": 64, "height": 64,
        "columns": {"sku": "{{ product.sku }}", "scene": "{{ scene.name }}"},
    }, sort_keys=False))
    manifest, out = tmp_path / "catalog.parquet", tmp_path / "out"
    assert main(["expand", str(tmp_path / "catalog.yaml"), "--output", str(manifest)]) == 0
    config = job(tiny_models)
    if group_by:
        config = config.model_copy(update={"report": ReportConfig(group_by=group_by)})
    summary, code = render(str(manifest), str(out), config)
    return CatalogRun(tmp_path, manifest, out, pq.ParquetFile(manifest).read().to_pylist(), shas, summary, code)

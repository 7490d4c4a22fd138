"""What the export tests check an export against, through the real loaders: the committed rows
of the output (by the ledger), and the datasets the `webdataset` and `datasets` libraries load
from DEST. Not a test module: the export tests import from here, and conftest registers it as
a plugin for its session fixture ``export_source`` (rendered once, read by every export test)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import passthrough_store
from localrun import manifest, rows

from klein_ray.output.ledger import Ledger
from klein_ray.storage import LocalStore, Store


def render_manifest(tmp: Path) -> tuple[str, list[dict]]:
    """Eleven rows in manifest order: six plain, one id with dots, one in JPEG, one whose
    reference is missing (it fails until the file appears) and two sharing an id (render rejects
    both). Shards of 4: [r0 dup r1 dotted], [r2 jpeg r3 edit], [r4 r5 dup]."""
    table = rows(6)
    table.insert(2, dict(rows(1, prefix="dotted.id.v")[0]))
    table.insert(4, dict(rows(1, prefix="jpeg")[0], format="jpeg"))
    table.insert(6, dict(rows(1, prefix="edit")[0], references=[str(tmp / "m" / "ref.png")]))
    table.append(dict(rows(1, prefix="dup")[0]))
    table.insert(1, dict(rows(1, prefix="dup")[0], seed=7))
    return manifest(tmp / "m" / "m.parquet", table), table


@pytest.fixture(scope="session")
def export_source(tmp_path_factory, tiny_models) -> tuple[str, list[dict]]:
    """An output of ``render_manifest``'s rows (and the rows): 8 committed, 1 failed, 2
    rejected. Read only."""
    from localrun import job, render

    tmp = tmp_path_factory.mktemp("export-source")
    uri, table = render_manifest(tmp)
    out = str(tmp / "out")
    summary, code = render(uri, out, job(tiny_models))
    assert code == 1 and summary["committed"] == 8, summary
    return out, table


def committed(out: str | Store) -> dict[str, dict]:
    """id -> {image bytes, prompt, format} of every row the ledger says is committed."""
    store = LocalStore(out) if isinstance(out, str) else out
    found = {}
    for record in Ledger(store).committed_rows():
        marker = json.loads(store.get(record.meta_key))
        found[record.id] = {"image": store.get(record.image_key), "prompt": marker["prompt"],
                            "ext": record.image_key.rsplit(".", 1)[1], "seed": marker["seed"]}
    return found


def webdataset_samples(dest: Path) -> dict[str, dict]:
    """id -> sample, read with the webdataset library from the shards the index lists."""
    import webdataset as wds

    index = json.loads((dest / "shardindex.json").read_text())
    urls = [str(dest / s["url"]) for s in index["shardlist"]]
    found: dict[str, dict] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["id"] not in found, f"{meta['id']} exported twice"
        image = next(sample[e] for e in ("png", "jpg", "webp") if e in sample)
        found[meta["id"]] = {"image": image, "prompt": sample["txt"].decode(), "meta": meta,
                             "key": sample["__key__"]}
    return found


def datasets_rows(dest: Path, cache: Path) -> list[dict]:
    """Every row `datasets.load_dataset(DEST)` gives, images as their bytes (offline: DEST is
    a local directory, nothing is asked of the Hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset(str(dest), split="train", cache_dir=str(cache))
    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return list(ds)


def shard_tables(dest: Path) -> list[dict]:
    """The per-shard tables' rows, in manifest order."""
    found = []
    for path in sorted((dest / "_shards").glob("*.parquet")):
        found.extend(pq.read_table(path).to_pylist())
    return found


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what byte-identical compares)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def identities(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime) of every file: a file rewritten in place gets a new one."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


class Stopped(Exception):
    """The forced stop of an export (what a kill at that instant would leave)."""


class StopAfter(passthrough_store()):  # type: ignore[misc]
    """A destination store that stops the export (raises) right after the object ``key`` is
    stored whole: the instant between a shard's file and its marker, forced, not timed."""

    def __init__(self, inner: Store, key: str):
        super().__init__(inner)
        self.key = key

    def put(self, key, data, **kw):
        etag = self.inner.put(key, data, **kw)
        self._maybe_stop(key)
        return etag

    def put_file(self, key, path, **kw):
        self.inner.put_file(key, path, **kw)
        self._maybe_stop(key)

    def _maybe_stop(self, key: str) -> None:
        if key == self.key:
            raise Stopped(f"export stopped after {key}")

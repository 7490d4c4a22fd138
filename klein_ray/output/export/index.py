"""The end of an export: files no shard names removed, then the shard index and the dataset
card rewritten (each one object, whole).

- ``shardindex.json`` follows wids' index format (``__kind__: wids-shard-index-v1``,
  ``shardlist`` of ``url`` relative to the index, ``nsamples``, ``filesize``), with each file's
  ``sha256`` and the export's settings and counts beside.
- ``README.md`` is a dataset card whose YAML header (``configs`` / ``data_files``, and the
  features under ``dataset_info``) lets ``datasets.load_dataset(DEST)`` load the export with no
  other argument: the Parquet files, or the tars through ``datasets``' webdataset builder (the
  declared features let samples of different image formats share one dataset).

Neither carries a date: the same shards give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from klein_ray.output.export.plan import CARD, INDEX, OWNED, ExportPlan, ShardStats
from klein_ray.storage import Store
from klein_ray.uris import redact

COUNTS = ("rows", "samples", "stale", "failed", "pending", "rejected")


def totals(stats: list[ShardStats]) -> dict[str, int]:
    return {c: sum(getattr(s, c) for s in stats) for c in COUNTS}


def finish(dest: Store, plan: ExportPlan, stats: list[ShardStats]) -> list[str]:
    """Remove what no current shard names (an earlier export's other sizes, parts or format),
    then write the index and the card. Returns the keys removed."""
    keep = {f.name for s in stats for f in (*s.files, s.table)}
    keep |= {f"_shards/{s.index:05d}_stats.json" for s in stats}
    removed = [o.key for o in dest.list() if OWNED.match(o.key) and o.key not in keep]
    for key in removed:
        dest.delete(key)
    dest.put(INDEX, shard_index(plan, stats), content_type="application/json")
    dest.put(CARD, dataset_card(plan, stats), content_type="text/markdown; charset=utf-8")
    return removed


def shard_index(plan: ExportPlan, stats: list[ShardStats]) -> bytes:
    shardlist = [{"url": f.name, "nsamples": f.nsamples, "filesize": f.filesize, "sha256": f.sha256,
                  "shard": s.index} for s in stats for f in s.files]
    doc = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "train", "format": plan.format,
           "source": redact(plan.source), **plan.settings(), **totals(stats), "shardlist": shardlist,
           "tables": [{"url": s.table.name, "filesize": s.table.filesize, "sha256": s.table.sha256,
                       "shard": s.index} for s in stats]}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def card_header(plan: ExportPlan, stats: list[ShardStats]) -> dict[str, Any]:
    """The card's YAML header: where the data files are and what their features are."""
    pattern = "*.tar" if plan.format == "webdataset" else "data/train-*"
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}],
        # No split sizes: datasets would refuse to load an export being rewritten if they differed.
        "dataset_info": {"features": _features(plan, stats)},
        "tags": ["klein-ray", "synthetic"],
    }


def _features(plan: ExportPlan, stats: list[ShardStats]) -> list[dict[str, Any]]:
    if plan.format == "parquet":
        return ([{"name": "image", "dtype": "image"}]
                + [{"name": n, "dtype": t} for n, t in (
                    ("key", "string"), ("id", "string"), ("prompt", "string"), ("seed", "int64"),
                    ("width", "int32"), ("height", "int32"), ("variant", "string"), ("format", "string"),
                    ("sha256", "string"), ("passthrough", "json"))])
    extensions = sorted({e for s in stats for e in s.extensions}) or ["png"]
    columns = [(e, "image") for e in extensions] + [("json", "json"), ("txt", "string")]
    return [{"name": n, "dtype": t} for n, t in sorted(columns)]


def dataset_card(plan: ExportPlan, stats: list[ShardStats]) -> bytes:
    header = yaml.safe_dump(card_header(plan, stats), sort_keys=False)
    count = totals(stats)
    files = sum(len(s.files) for s in stats)
    how = ("Each shard is a tar of samples `KEY.{png,jpg,webp}` (the image), `KEY.txt` (the prompt) "
           "and `KEY.json` (key, id, prompt, seed, width, height, variant, format, sha256, passthrough)."
           if plan.format == "webdataset" else
           "Parquet files with an `image` column (the image's bytes, declared as the `datasets` Image "
           "feature) and key, id, prompt, seed, width, height, variant, format, sha256 and passthrough "
           "(the manifest's extra columns, a JSON object).")
    n = plan.rows_per_shard
    body = f"""# Rendered with klein-ray

Exported from `{redact(plan.source)}` as {plan.format}: {count['samples']} samples of
{count['rows']} manifest rows, in {plan.shards} shards of {n} manifest rows
({files} files; shard `k` holds the rows at manifest positions `[k*{n}, (k+1)*{n})`).

{how}

Only committed rows are samples. Every manifest row is listed in `_shards/NNNNN.parquet` with its
status: `exported`, `stale` (exported; its manifest row was edited since it was rendered),
`failed` (with the render's stage, error type and message), `rejected` (a duplicate id, no id)
or `pending` (not rendered yet, or its commit is broken: `klein-ray verify`). Here:
{count['failed']} failed, {count['pending']} pending, {count['rejected']} rejected, {count['stale']} stale.

`shardindex.json` lists every shard file with its sample count, size and sha256.

```python
import datasets
ds = datasets.load_dataset("path/to/this/directory", split="train")
```
"""
    return f"---\n{header}---\n\n{body}".encode()

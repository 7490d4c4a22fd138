"""The Parquet writer: a shard as a Hugging Face style Parquet file (``data/train-*.parquet``).

Columns: ``image`` (struct of ``bytes`` and ``path``, declared as the ``datasets`` Image feature
in the schema's ``huggingface`` metadata, so it decodes as an image), then ``samples``' fields:
key, id, prompt, seed, width, height, variant, format, sha256, and passthrough (the manifest's
extra columns as a JSON object, serialised: one type for every row whatever columns each
manifest file has; the dataset card declares it ``json``, so ``datasets`` decodes it). Row
groups of ``ROW_GROUP_ROWS`` rows (``datasets``' own size for image data), so memory holds one
row group at a time. Same rows, same pyarrow: same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from klein_ray.output.export.samples import Sample

CONTENT_TYPE = "application/vnd.apache.parquet"
ROW_GROUP_ROWS = 100

# datasets' feature declarations for the columns (its ``Features.to_dict`` form).
FEATURES: dict[str, Any] = {
    "image": {"_type": "Image"},
    "key": {"dtype": "string", "_type": "Value"},
    "id": {"dtype": "string", "_type": "Value"},
    "prompt": {"dtype": "string", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "width": {"dtype": "int32", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "variant": {"dtype": "string", "_type": "Value"},
    "format": {"dtype": "string", "_type": "Value"},
    "sha256": {"dtype": "string", "_type": "Value"},
    "passthrough": {"dtype": "string", "_type": "Value"},
}
SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("key", pa.string()),
     ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("width", pa.int32()),
     ("height", pa.int32()), ("variant", pa.string()), ("format", pa.string()), ("sha256", pa.string()),
     ("passthrough", pa.string())],
    metadata={"huggingface": json.dumps({"info": {"features": FEATURES}}, sort_keys=True)},
)


class ParquetShardWriter:
    """Appends samples to a Parquet file at ``path``, a row group at a time; ``close`` ends it."""

    def __init__(self, path: Path):
        self._writer = pq.ParquetWriter(str(path), SCHEMA)
        self._rows: list[dict[str, Any]] = []
        self.samples = 0

    def add(self, sample: Sample, image: bytes) -> None:
        row = dict(sample.meta, image={"bytes": image, "path": f"{sample.key}.{sample.ext}"})
        row["passthrough"] = json.dumps(sample.meta["passthrough"], sort_keys=True, ensure_ascii=False,
                                        default=str)
        self._rows.append(row)
        self.samples += 1
        if len(self._rows) >= ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=SCHEMA))
            self._rows = []

"""Dataset export: committed rows of an output packed as WebDataset shards or a Hugging Face
Parquet dataset, deterministic, exactly once and resumable.

- ``plan.py``: the named types (``ExportPlan``, ``ShardRow``, ``ShardTask``, ``ShardStats``),
  every key the export writes under DEST, the shard-part rule for ``max_shard_bytes`` and the
  shard's inputs digest.
- ``samples.py``: what one exported sample is (its key, image, caption, metadata), built from
  the marker the ledger judged.
- ``webdataset.py`` / ``parquet.py``: the writers, one per format, into a local file.
- ``shard.py``: builds (or skips) one shard: judge its rows through the ledger, write its files,
  its per-shard table and last its stats marker.
- ``index.py``: the shard index (wids' JSON format) and the dataset card ``README.md``.

The command (``klein_ray/commands/export.py``) reads the manifest (row order) and the errors
table and hands shards to these through the executor; nothing here reads a manifest.
"""

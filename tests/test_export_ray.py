"""`klein-ray export --executor ray`: shards built as Ray tasks (the builder shipped by
reference), the same bytes as the in-process export's."""

from __future__ import annotations

from exportcheck import tree

from klein_ray.commands.export import export_output


def test_shards_built_as_ray_tasks_match_the_local_export(export_source, ray_address, tmp_path):
    out, _ = export_source
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    export_output(out, "parquet", str(local), rows_per_shard=4)
    summary = export_output(out, "parquet", str(on_ray), rows_per_shard=4, executor="ray", address=ray_address)
    assert (summary.built, summary.samples, summary.failed) == (3, 8, 1)
    assert tree(on_ray) == tree(local)

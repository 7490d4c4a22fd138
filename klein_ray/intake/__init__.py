"""Intake: Parquet manifests in, validated rows (``RowSpec``) and work units (``WorkUnit``) out."""

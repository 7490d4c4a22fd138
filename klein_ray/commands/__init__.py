"""The commands behind the CLI, each thin over the rooms below: render (picks the executor),
validate, status, verify, demo."""

"""The commands behind the CLI: render (picks the executor), validate, status, demo."""

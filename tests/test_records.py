"""What klein-ray records about rows and references: ids as written, URLs without their secrets,
metadata that is always valid JSON, and manifest columns in every encoding Parquet writers use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from klein_ray.assets.references import ReferenceError, ReferenceFetcher
from klein_ray.config import JobConfig, ReferenceConfig, StorageConfig, VariantConfig
from klein_ray.intake.manifest import Manifest
from klein_ray.intake.rows import RowValidator, json_safe
from klein_ray.output.ledger import Ledger
from klein_ray.storage import LocalStore
from klein_ray.uris import redact

CONFIG = JobConfig(variants={"tiny": VariantConfig(source="./m")}, default_variant="tiny")


def _strict_json(data: bytes):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(data, parse_constant=refuse)


@pytest.mark.parametrize("row_id, recorded", [
    ("a/b", "a/b"),
    ("../escape", "../escape"),
    ("has space", "has space"),
    ("line\nbreak\x1b[31m", "line\\nbreak\\x1b[31m"),
    (42, "42"),
    (None, "<row 7>"),
])
def test_an_invalid_id_is_recorded_as_written(row_id, recorded):
    errors = RowValidator(CONFIG).validate({"id": row_id, "prompt": "x"}, "m.parquet", 7)
    assert [e.id for e in errors] == [recorded]


def test_a_very_long_invalid_id_is_cut():
    (error,) = RowValidator(CONFIG).validate({"id": "x" * 10_000, "prompt": "x"}, "m.parquet", 0)
    assert len(error.id) <= 160 and error.id.startswith("xxx") and error.id.endswith("...")


@pytest.mark.parametrize("uri, expected", [
    ("http://[::1]:8080/a.png?X-Amz-Signature=s", "http://[::1]:8080/a.png?REDACTED"),
    ("https://user:pw@[2001:db8::1]/a.png", "https://[2001:db8::1]/a.png"),
    ("http://host:notaport/a.png?sig=s", "http://host:notaport/a.png?REDACTED"),
    ("https://cdn.example.com/a.png", "https://cdn.example.com/a.png"),
])
def test_redact_keeps_the_address_and_drops_the_secrets(uri, expected):
    assert redact(uri) == expected


def test_an_error_that_quotes_a_signed_url_does_not_leak_it():
    """http.client's InvalidURL repeats the path and query it refuses."""
    fetcher = ReferenceFetcher(ReferenceConfig(allow_private_hosts=["127.0.0.1"]), StorageConfig())
    uri = "http://127.0.0.1:9/a b.png?X-Amz-Signature=SECRETSIG"
    with pytest.raises(ReferenceError) as caught:
        fetcher.read(uri)
    message = str(caught.value)
    assert "SECRETSIG" not in message and "InvalidURL" in message
    assert "http://127.0.0.1:9/a b.png?REDACTED" in message


def test_non_finite_passthrough_values_become_strings_and_the_marker_stays_json(tmp_path):
    raw = {"id": "r1", "prompt": "x", "score": float("nan"), "tags": {"w": [1.5, float("-inf")]}}
    spec = RowValidator(CONFIG).validate(raw, "m.parquet", 0)
    assert spec.passthrough == {"score": "nan", "tags": {"w": [1.5, "-inf"]}}
    ledger = Ledger(LocalStore(tmp_path))
    ledger.commit("r1", "png", b"png bytes", "image/png", {"passthrough": spec.passthrough})
    marker = _strict_json((tmp_path / "meta" / "r1.json").read_bytes())
    assert marker["passthrough"]["score"] == "nan"
    with pytest.raises(ValueError):  # and nothing can slip a NaN into a marker
        ledger.commit("r2", "png", b"png bytes", "image/png", {"x": math.inf})
    assert json_safe(("a", 1)) == ["a", 1]


def test_dictionary_encoded_columns_and_an_all_null_references_column_are_read(tmp_path):
    table = pa.table({
        "id": pa.array(["a", "b"]).dictionary_encode(),
        "prompt": pa.array(["p1", "p2"]).dictionary_encode(),
        "variant": pa.array(["tiny", None]).dictionary_encode(),
        "format": pa.array(["png", "jpeg"]).dictionary_encode(),
        "references": pa.array([None, None], pa.null()),
    })
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    assert pq.ParquetFile(path).schema_arrow.field("references").type == pa.null()
    with Manifest(str(path)) as manifest:
        rows = [raw for _, _, raw in manifest.iter_rows()]
    specs = [RowValidator(CONFIG, base_dir=Path("/")).validate(raw, "m.parquet", i) for i, raw in enumerate(rows)]
    assert [(s.id, s.prompt, s.variant, s.format, s.references) for s in specs] == [
        ("a", "p1", "tiny", "png", ()), ("b", "p2", "tiny", "jpeg", ())]


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_file_reference_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """A FIFO would block the worker forever waiting for a writer; a device never ends."""
    import os
    import threading

    if kind == "fifo":
        target = tmp_path / "pipe.png"
        os.mkfifo(target)
    elif kind == "device":
        target = Path("/dev/zero")
    else:
        target = tmp_path / "dir.png"
        target.mkdir()
    # Both directories allowed: this is about what is read, not where (test_confinement.py).
    fetcher = ReferenceFetcher(ReferenceConfig(local_roots=[str(tmp_path), "/dev"]), StorageConfig())
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_try_read(fetcher, target.as_uri())), daemon=True)
    reader.start()
    reader.join(timeout=30)  # a hang detector, not a speed target: the read returns at once
    assert not reader.is_alive(), f"reading a {kind} blocked"
    (error,) = outcome
    assert isinstance(error, ReferenceError) and "not a regular file" in str(error)


def _try_read(fetcher, uri):
    try:
        fetcher.read(uri)
    except Exception as exc:
        return exc
    return None

"""`klein-ray validate` on the hostile manifest (and on the allow-list one): it names every bad
row as written and exits 2, names no good row, contacts no refused address and prints no
secret; and a reference that drips one byte at a time cannot stall a fetch."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from helpers import run_cli
from hostile_fixtures import ALLOWED_BAD, leaks, secret_env
from hostile_inputs import MAX_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


LINE = re.compile(r"^(?P<file>.*): row (?P<row>\d+) id=(?P<id>.*?) column=(?P<column>\S+): (?P<message>.*)$")


def _validate(hostile, servers, *args, manifest=None, config=None):
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    proc = run_cli("validate", str(manifest or hostile.manifest), "--config", str(config or hostile.config),
                   *args, env=secret_env(), cwd=hostile.cwd, timeout=300)
    named = {}
    for line in proc.stdout.splitlines():
        m = LINE.match(line)
        if m:
            named.setdefault((Path(m["file"]).name, int(m["row"])), []).append(line)
    requests = {n: getattr(servers, n).since(m) for n, m in marks.items()}
    return proc, named, requests


@pytest.fixture(scope="module")
def validated(hostile, servers):
    return _validate(hostile, servers)


@pytest.fixture(scope="module")
def validated_refs(hostile, servers):
    return _validate(hostile, servers, "--check-references")


def test_validate_exits_2_and_names_every_row_invalid_as_written(validated, hostile):
    proc, named, _ = validated
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    unnamed = [c.name for c in hostile.cases if c.stage == "validate" and (c.file, c.index) not in named]
    assert not unnamed, f"validate did not name: {unnamed}"
    for c in hostile.cases:
        if c.stage == "validate" and isinstance(c.raw["id"], str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", c.raw["id"]):
            assert any(f"id={c.raw['id']} " in line for line in named[(c.file, c.index)]), named[(c.file, c.index)]
    assert "\x1b" not in proc.stdout, "a raw terminal escape from an id reached the terminal"
    assert not leaks(proc.stdout + proc.stderr)


def test_validate_does_not_name_good_rows(validated, validated_refs, hostile):
    for label, (_, named, _) in (("validate", validated), ("validate --check-references", validated_refs)):
        flagged = {c.raw["id"]: named[(c.file, c.index)] for c in hostile.cases
                   if c.good and (c.file, c.index) in named}
        assert not flagged, f"{label} flagged good rows: {flagged}"


def test_validate_check_references_names_every_bad_row(validated_refs, hostile):
    proc, named, _ = validated_refs
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    unnamed = {c.name: (c.stage, c.needles) for c in hostile.cases if not c.good and (c.file, c.index) not in named}
    assert not unnamed, f"validate --check-references did not name these bad rows: {unnamed}"
    for c in hostile.cases:
        if c.stage == "fetch":
            text = " ".join(named[(c.file, c.index)])
            assert all(n in text for n in c.needles), (c.name, c.needles, text)


def test_validate_check_references_contacts_no_refused_address_and_prints_no_secret(validated_refs):
    proc, _, requests = validated_refs
    assert requests == {"lo": [], "lo6": [], "lo2": []}, requests
    assert not leaks(proc.stdout + proc.stderr), leaks(proc.stdout + proc.stderr)


def test_validate_good_rows_only_exits_0(hostile, servers):
    for args in ((), ("--check-references",)):
        proc, named, _ = _validate(hostile, servers, *args, manifest=hostile.good_manifest)
        assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
        assert not named


def test_validate_check_references_on_allowlisted_host(allowed, hostile, servers):
    proc, named, requests = _validate(hostile, servers, "--check-references",
                                      manifest=allowed.manifest, config=allowed.config)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = {line.split(" id=", 1)[1].split(" column=", 1)[0] for lines in named.values() for line in lines}
    assert ids == ALLOWED_BAD, (f"validate --check-references named {sorted(ids)}; "
                                f"missing {sorted(ALLOWED_BAD - ids)}, unexpected {sorted(ids - ALLOWED_BAD)}\n"
                                + proc.stdout)
    assert requests["lo2"] == [] and requests["lo6"] == []
    assert not leaks(proc.stdout + proc.stderr), leaks(proc.stdout + proc.stderr)


def test_slow_drip_reference_cannot_stall_a_fetch(servers):
    """A server that sends one byte at a time, each well within the socket timeout, must not hold
    a fetch (and so a worker and the whole job) for hours: the timeout has to bound the fetch."""
    from klein_ray.assets.references import ReferenceFetcher
    from klein_ray.config import ReferenceConfig, StorageConfig

    stop = threading.Event()

    def drip(h, _rec):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(MAX_BYTES - 1))
        h.end_headers()
        try:
            while not stop.wait(0.2):
                h.wfile.write(b"\x00")
                h.wfile.flush()
        except OSError:
            pass

    servers.lo.routes["/drip"] = drip
    fetcher = ReferenceFetcher(ReferenceConfig(timeout=1, max_bytes=MAX_BYTES, allow_private_hosts=["127.0.0.1"]),
                               StorageConfig())
    outcome = {}

    def fetch():
        try:
            fetcher.fetch(f"http://127.0.0.1:{servers.lo.port}/drip")
            outcome["result"] = "fetched"
        except Exception as exc:
            outcome["result"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(8)
    stalled = worker.is_alive()
    stop.set()  # release the fetch either way
    worker.join(10)
    assert not stalled, ("a reference dripping 1 byte per 0.2 s kept the fetch busy past 8 s with "
                         "references.timeout=1 (the timeout is per socket read, not per fetch; at this "
                         f"rate the {MAX_BYTES}-byte cap is reached after ~11 h); outcome: {outcome}")
    assert outcome["result"].startswith("ReferenceError"), outcome

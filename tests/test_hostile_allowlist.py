"""Hostile input through an allow-listed internal host (127.0.0.1 in
`references.allow_private_hosts`; the render is `hostile_fixtures.allowed`): redirects are
re-checked, the size cap applies while reading, signed URLs are redacted, and a redirect to
another scheme is refused."""

from __future__ import annotations

import pytest
from helpers import assert_done, last_json
from hostile_fixtures import ALLOWED_BAD, ALLOWED_GOOD, errors_of, leaks, leaks_in_tree
from hostile_inputs import MAX_BYTES, PRIVATE_MSG, SIGNED_QUERY
from hostile_server import STREAM_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_allowlist_render_summary(allowed):
    proc = allowed.proc
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = last_json(proc.stdout)
    committed = {p.stem for p in (allowed.out / "meta").glob("*.json")}
    assert committed == ALLOWED_GOOD, f"committed {sorted(committed)}, expected {sorted(ALLOWED_GOOD)}"
    assert (summary["committed"], summary["failed"]) == (len(ALLOWED_GOOD), len(ALLOWED_BAD)), summary


def test_redirect_to_a_non_http_scheme_is_refused(allowed):
    errors = {e["id"]: e for e in errors_of(allowed.out)}
    assert "redirect-to-ftp" in errors, (
        "a 302 to ftp://127.0.0.1:PORT/ok.png was followed as plain http (the row rendered); "
        "redirects must be limited to http(s)")
    assert errors["redirect-to-ftp"]["stage"] == "fetch"


def test_allowlisted_host_renders_and_redirects_are_rechecked(allowed):
    proc = allowed.proc
    assert proc.returncode == 1, proc.stderr[-4000:]
    for row_id in ("allowed-plain", "allowed-signed", "allowed-redirect"):
        assert_done(allowed.store, row_id)
    errors = {e["id"]: e for e in errors_of(allowed.out)}
    for row_id in ("redirect-to-metadata", "redirect-to-other-loopback"):
        assert errors[row_id]["stage"] == "fetch" and PRIVATE_MSG in errors[row_id]["message"], errors[row_id]
    assert "169.254.169.254" in errors["redirect-to-metadata"]["message"]
    assert "127.0.0.2" in errors["redirect-to-other-loopback"]["message"]
    assert "redirects" in errors["redirect-loop"]["message"]
    assert "HTTP 404" in errors["http-404"]["message"]
    # The redirect target outside the allowlist was never contacted.
    assert allowed.requests["lo2"] == [] and allowed.lo2_connections == 0
    assert allowed.requests["lo6"] == []


def test_http_size_cap_applies_while_reading(allowed):
    errors = {e["id"]: e for e in errors_of(allowed.out)}
    for row_id in ("big-declared", "big-stream"):
        assert errors[row_id]["stage"] == "fetch", errors[row_id]
        assert f"larger than {MAX_BYTES} bytes" in errors[row_id]["message"], errors[row_id]
    # Without a Content-Length, reading stopped near the cap, not at the end of the 64 MiB body.
    assert allowed.stream_sent < STREAM_BYTES // 4, f"server sent {allowed.stream_sent} bytes before the client stopped"
    # A permanent refusal is not retried.
    assert allowed.requests["lo"].count("/big-stream") == 1, allowed.requests["lo"]
    assert allowed.requests["lo"].count("/big-declared") == 1, allowed.requests["lo"]


def test_signed_url_is_redacted_and_no_secret_is_printed_or_stored(allowed):
    # The signature really was sent to the server ...
    assert f"/img.png?{SIGNED_QUERY}" in allowed.requests["lo"]
    # ... and is recorded nowhere.
    [ref] = assert_done(allowed.store, "allowed-signed")["references"]
    assert ref["uri"].startswith(f"{allowed.base}/img.png") and "SECRETSIG123" not in ref["uri"], ref
    proc = allowed.proc
    assert not leaks(proc.stdout + proc.stderr), leaks(proc.stdout + proc.stderr)
    assert not leaks_in_tree(allowed.out), leaks_in_tree(allowed.out)
    outside = sorted(p for p in allowed.changed if not p.startswith(str(allowed.out)))
    assert not outside, outside

"""Hostile input, end to end (issue "Hostile input").

"A manifest mixing good rows with every kind of bad row renders the good rows, records each bad
one in the errors table with its reason, exits 1, writes nothing outside OUT, makes no request
to a refused address, and prints no secret; `validate` on it names every bad row and exits 2."

One hostile manifest (a directory of two Parquet files, `hostile_inputs.py`) is rendered ONCE a
session (`hostile_fixtures.py`) on the session's Ray, with local HTTP servers on 127.0.0.1, ::1
and 127.0.0.2 that record every request they receive. This module judges that render: the
outputs, the errors table, the servers' request logs, the file tree. The allow-list render is
judged in test_hostile_allowlist.py, `klein-ray validate` in test_hostile_validate.py.
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from helpers import assert_done, last_json, run_cli
from hostile_fixtures import error_for, errors_of, leaks, leaks_in_tree
from hostile_inputs import BAD_KEYS, BAD_NAMES, GOOD_IDS, HTML_PROMPT, LONG_PROMPT, MAX_SEQ

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def test_render_exits_1_with_a_summary_of_good_and_bad_rows(hostile):
    proc = hostile.proc
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    summary = last_json(proc.stdout)
    good = [c for c in hostile.cases if c.good]
    bad = [c for c in hostile.cases if not c.good]
    assert summary["total"] == len(hostile.cases)
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    committed = {p.stem for p in (hostile.out / "meta").glob("*.json")}
    missing = sorted({c.raw["id"] for c in good} - committed)
    assert not missing, f"good rows not committed: {missing}; errors: " + str(
        [e for e in errors_of(hostile.out) if e["id"] in missing])
    assert (summary["committed"], summary["failed"]) == (len(good), len(bad)), summary


@pytest.mark.parametrize("row_id", GOOD_IDS)
def test_good_row_is_done(hostile, row_id):
    assert (hostile.out / "meta" / f"{row_id}.json").is_file(), (
        f"{row_id!r} was not rendered; its error records: "
        f"{[e for e in errors_of(hostile.out) if e['id'] == row_id]}")
    meta = assert_done(hostile.store, row_id)
    assert (meta["width"], meta["height"]) == (64, 64)


@pytest.mark.parametrize("row_id,name,size", [
    ("good-rgba", "rgba.png", (64, 64)), ("good-relative", "rgba.png", (64, 64)),
    ("good-palette", "palette.png", (64, 64)), ("good-cmyk", "cmyk.jpg", (64, 64)),
    ("good-gray16", "gray16.png", (64, 64)),
    ("good-exif6", "exif6.jpg", (64, 96)),  # stored 96x64, EXIF orientation 6: rotated
])
def test_reference_decoded_and_recorded(hostile, row_id, name, size):
    meta = assert_done(hostile.store, row_id)
    [ref] = meta["references"]
    data = hostile.inp[name].read_bytes()
    assert ref["sha256"] == hashlib.sha256(data).hexdigest() and ref["bytes"] == len(data)
    assert (ref["width"], ref["height"]) == size
    assert ref["uri"] == hostile.inp[name].resolve().as_uri()


def test_long_prompt_renders_with_a_truncation_warning(hostile):
    meta = assert_done(hostile.store, "good-long-prompt")
    assert meta["prompt"] == LONG_PROMPT
    warnings = meta.get("warnings")
    assert warnings and any(str(MAX_SEQ) in w and "tokens" in w for w in warnings), warnings
    # Short prompts rendered in the same batch carry no warning.
    for row_id in ("good-t2i", "good-seed-max", "good-rgba"):
        assert assert_done(hostile.store, row_id)["warnings"] == [], row_id


def test_hostile_text_round_trips_and_is_escaped_in_the_report(hostile):
    meta = assert_done(hostile.store, "good-html-prompt")
    assert meta["prompt"] == HTML_PROMPT and meta["passthrough"]["sku"] == "<b>sku</b>"
    assert assert_done(hostile.store, "good-seed-max")["seed"] == 2**63 - 1
    assert assert_done(hostile.store, "good-uint64-seed")["seed"] == 12345
    report = (hostile.out / "_job" / "report.html").read_text()
    assert "<script>alert" not in report and "<img src=x" not in report and "<b>sku" not in report
    assert "\x1b" not in report  # the ANSI-escape id is shown escaped, not raw


@pytest.mark.parametrize("key", BAD_KEYS, ids=BAD_NAMES)
def test_bad_row_is_one_error_record_with_its_reason(hostile, key):
    case = next(c for c in hostile.cases if (c.file, c.index) == key)
    records = error_for(errors_of(hostile.out), case)
    assert len(records) == 1, f"{case.name}: expected one error record, got {records}"
    err = records[0]
    assert err["stage"] == case.stage, err
    if case.column:
        assert err["column"] == case.column, err
    text = f"{err['error_type']}: {err['message']}"
    for needle in case.needles:
        assert needle in text, f"{case.name}: {needle!r} not in {text!r}"
    row_id = case.raw["id"]
    if isinstance(row_id, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", row_id):
        assert err["id"] == row_id
        assert not (hostile.out / "meta" / f"{row_id}.json").exists()
    else:
        # An invalid id is recorded as written, control characters escaped (or "<row N>").
        assert err["id"] and "\n" not in err["id"] and "\x1b" not in err["id"], err


def test_no_request_reached_a_refused_address(hostile):
    assert hostile.requests == {"lo": [], "lo6": [], "lo2": []}, hostile.requests
    assert hostile.connections == {"lo": 0, "lo6": 0, "lo2": 0}, hostile.connections


def test_nothing_written_outside_out(hostile):
    out = str(hostile.out)
    outside = sorted(p for p in hostile.changed if p != out and not p.startswith(out + os.sep))
    assert not outside, f"written outside OUT: {outside}"
    assert not hostile.tmp_new, f"new entries in /tmp: {hostile.tmp_new}"
    assert list(hostile.cwd.iterdir()) == []
    assert list(hostile.tmpdir.iterdir()) == [], "temporary files left behind"
    # No key escaped through an id: every image/meta name is a valid id.
    for p in hostile.out.rglob("*"):
        assert ".." not in p.relative_to(hostile.out).parts
    assert not list(hostile.base.rglob("escape*"))


def test_no_secret_in_output_streams_or_files(hostile):
    proc = hostile.proc
    assert not leaks(proc.stdout + proc.stderr), leaks(proc.stdout + proc.stderr)
    assert not leaks_in_tree(hostile.out), leaks_in_tree(hostile.out)


def test_status_counts_from_storage(hostile):
    proc = run_cli("status", str(hostile.out))
    good = sum(c.good for c in hostile.cases)
    assert last_json(proc.stdout) == {"committed": good, "failed": len(hostile.cases) - good, "remaining": 0,
                                      "foreign": 0, "unreadable": 0, "stale": 0, "outdated": 0}

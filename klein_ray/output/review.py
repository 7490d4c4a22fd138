"""The review loop around the contact sheet: reference thumbnails, groups, rejects and attempts.

This module owns what the report page needs to be a review sheet, and the formats that loop
passes around:

* the page's parts: each edit's reference thumbnails (stored once per reference sha256 in a
  JSON block and set by a small inline script, so a product photo used by 20 shots is in the
  page once), sections grouped by a column of the rows' metadata, and a Reject button per card
  whose choices download as a small rejects file (a Blob link: the page still opens offline and
  fetches nothing);
* the rejects file (``REJECTS_KIND``, JSON: the output it came from and the rejected ids; a plain
  text file of ids, one a line, is accepted too) and ``read_rejects``;
* attempt ids: a row rendered again is ``{id}.r2``, then ``.r3`` (``attempt_of``,
  ``next_attempt_id``), so a second pass lands beside the first and the page shows which shot
  superseded which.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REJECTS_KIND = "klein-ray rejects"
REJECTS_VERSION = 1
ATTEMPT = re.compile(r"(?P<base>.+)\.r(?P<n>[2-9]|[1-9][0-9]+)")
MAX_ID = 128  # the manifest's id limit (intake.rows.ID_PATTERN)
NO_GROUP = "(none)"


class RejectsError(ValueError):
    """A rejects file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Rejects:
    ids: list[str]  # in the order given, each once
    output: str | None  # the output the page was built for (None: a plain list of ids)


def read_rejects(data: bytes, name: str) -> Rejects:
    """The rejects file's ids: the page's JSON, or a text file of ids (one a line, '#' comments)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectsError(f"{name}: not UTF-8 text") from None
    if text.lstrip().startswith("{"):
        try:
            found = json.loads(text)
        except ValueError as exc:
            raise RejectsError(f"{name}: not valid JSON ({exc})") from None
        if not isinstance(found, dict) or found.get("kind") != REJECTS_KIND:
            raise RejectsError(f"{name}: not a klein-ray rejects file (expected \"kind\": \"{REJECTS_KIND}\")")
        if found.get("version") != REJECTS_VERSION:
            raise RejectsError(f"{name}: rejects file version {found.get('version')!r}, this klein-ray "
                               f"reads version {REJECTS_VERSION}")
        ids, output = found.get("rejected"), found.get("output")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise RejectsError(f"{name}: \"rejected\" must be a list of ids")
        if output is not None and not isinstance(output, str):
            raise RejectsError(f"{name}: \"output\" must be a string")
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        output = None
    if not ids:
        raise RejectsError(f"{name}: no rejected ids")
    return Rejects(list(dict.fromkeys(ids)), output)


def attempt_of(row_id: str) -> tuple[str, int]:
    """(the first attempt's id, this attempt's number): ``mug-0.r3`` -> (``mug-0``, 3)."""
    found = ATTEMPT.fullmatch(row_id)
    return (found["base"], int(found["n"])) if found else (row_id, 1)


def next_attempt_id(row_id: str, taken: Callable[[str], bool]) -> str:
    """The id of the next attempt at ``row_id`` that ``taken`` does not claim; ValueError when
    it would pass the manifest's 128-character id limit."""
    base, n = attempt_of(row_id)
    while True:
        n += 1
        candidate = f"{base}.r{n}"
        if len(candidate) > MAX_ID:
            raise ValueError(f"id {row_id!r} ({len(row_id)} characters) has no room for its attempt suffix "
                             f"'.r{n}' within the {MAX_ID}-character id limit; shorten the ids (e.g. the "
                             "catalog's id template) and render them anew")
        if not taken(candidate):
            return candidate


def superseded(ids: list[str]) -> dict[str, str]:
    """id -> the latest later attempt at it among ``ids`` (for ids that have one)."""
    latest: dict[str, tuple[int, str]] = {}
    for row_id in ids:
        base, n = attempt_of(row_id)
        if base not in latest or n > latest[base][0]:
            latest[base] = (n, row_id)
    found = {}
    for row_id in ids:
        base, n = attempt_of(row_id)
        if latest[base][0] > n:
            found[row_id] = latest[base][1]
    return found


def group_value(meta: dict[str, Any] | None, column: str) -> str | None:
    """A row's value of ``column``: a passthrough column of its marker, else a marker field
    (``variant``, ``seed``, ...); None when it has none."""
    if not isinstance(meta, dict):
        return None
    passthrough = meta.get("passthrough")
    if isinstance(passthrough, dict) and passthrough.get(column) is not None:
        return str(passthrough[column])
    value = meta.get(column)
    return None if value is None or isinstance(value, (dict, list)) else str(value)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> block: no '<' can close it or open a comment."""
    return json.dumps(value, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")


def reference_store(entries: list[Any]) -> str:
    """Each distinct reference thumbnail once, as data: URIs by sha256 (set into the cards'
    ``img.ref`` by the script)."""
    store: dict[str, str] = {}
    for entry in entries:
        for sha, thumb in zip(entry.reference_sha256, entry.reference_thumbnails):
            if sha not in store and thumb:
                store[sha] = "data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii")
    return f'<script type="application/json" id="kr-refs">{_script_json(store)}</script>'


def references_html(entry: Any) -> str:
    """The card's row of reference thumbnails (empty for a text-to-image row)."""
    shas = list(entry.reference_sha256)
    if not shas:
        return ""
    imgs = "".join(
        f'<img class="ref" data-ref="{_e(sha)}" alt="reference {i + 1} of {_e(entry.id)}" '
        f'title="reference {i + 1}: sha256 {_e(sha[:12])}…" loading="eager">'
        for i, sha in enumerate(shas))
    return f'<div class="refs"><span class="refs-label">made from</span>{imgs}</div>'


def toolbar(output: str, run_id: str) -> str:
    """The reviewer's bar: how many are rejected, and the rejects file's download."""
    meta = _script_json({"output": output, "run_id": run_id, "kind": REJECTS_KIND,
                         "version": REJECTS_VERSION})
    return (
        f'<script type="application/json" id="kr-review">{meta}</script>'
        '<div class="review" id="kr-toolbar"><span>Review: mark shots to render again with '
        '<b>Reject</b>, then download the rejects file for <code>klein-ray reroll</code>.</span>'
        '<span class="rcount"><b id="kr-count">0</b> rejected</span>'
        '<button type="button" id="kr-clear">Clear</button>'
        '<button type="button" id="kr-download" disabled>Download rejects</button></div>'
        '<noscript><div class="banner cap">Reference thumbnails and rejecting shots need '
        "JavaScript.</div></noscript>"
    )


REVIEW_CSS = """
.review { position:sticky; top:0; z-index:2; display:flex; flex-wrap:wrap; gap:10px 16px;
  align-items:center; background:#fff; border:1px solid var(--line); border-radius:10px;
  padding:10px 14px; margin:0 0 16px; box-shadow:0 2px 6px rgba(20,30,60,.06); }
.review .rcount { margin-left:auto; }
.review button, .card button.reject { font:inherit; border-radius:8px; border:1px solid var(--line);
  background:#f8f9fb; padding:4px 12px; cursor:pointer; }
.review button:disabled { opacity:.45; cursor:default; }
#kr-download:not(:disabled) { background:var(--accent); border-color:var(--accent); color:#fff; }
.card button.reject[aria-pressed="true"] { background:var(--bad); border-color:var(--bad); color:#fff; }
.card.rejected { outline:3px solid var(--bad); }
.card.superseded { opacity:.6; }
.refs { display:flex; gap:4px; align-items:center; flex-wrap:wrap; }
.refs-label { color:var(--muted); font-size:11px; margin-right:2px; }
.refs img.ref { width:48px; height:48px; object-fit:cover; border-radius:6px; border:1px solid var(--line);
  background:#e9ebf0; }
.chip.attempt { background:#fff3e0; color:#8a4b00; }
section.group h3 { font-size:15px; margin:22px 0 10px; }
section.group h3 .count { color:var(--muted); font-weight:400; }
"""

REVIEW_JS = """
(function () {
  var meta = JSON.parse(document.getElementById('kr-review').textContent);
  var refs = JSON.parse(document.getElementById('kr-refs').textContent);
  document.querySelectorAll('img.ref[data-ref]').forEach(function (img) {
    var src = refs[img.getAttribute('data-ref')];
    if (src) { img.src = src; }
  });
  var key = 'klein-ray-rejects:' + meta.output + ':' + meta.run_id;
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card[data-id]'));
  var rejected = new Set();
  try { JSON.parse(localStorage.getItem(key) || '[]').forEach(function (id) { rejected.add(id); }); }
  catch (e) { /* no storage for file:// pages here: marks last as long as the page */ }
  var count = document.getElementById('kr-count');
  var download = document.getElementById('kr-download');
  function chosen() {
    return cards.map(function (c) { return c.getAttribute('data-id'); })
      .filter(function (id) { return rejected.has(id); });
  }
  function show() {
    cards.forEach(function (card) {
      var on = rejected.has(card.getAttribute('data-id'));
      card.classList.toggle('rejected', on);
      var button = card.querySelector('button.reject');
      button.setAttribute('aria-pressed', on ? 'true' : 'false');
      button.textContent = on ? 'Rejected' : 'Reject';
    });
    var n = chosen().length;
    count.textContent = String(n);
    download.disabled = n === 0;
    try { localStorage.setItem(key, JSON.stringify(chosen())); } catch (e) { /* see above */ }
  }
  document.addEventListener('click', function (event) {
    var button = event.target.closest && event.target.closest('button.reject');
    if (!button) { return; }
    var id = button.closest('.card').getAttribute('data-id');
    if (rejected.has(id)) { rejected.delete(id); } else { rejected.add(id); }
    show();
  });
  document.getElementById('kr-clear').addEventListener('click', function () { rejected.clear(); show(); });
  download.addEventListener('click', function () {
    var body = JSON.stringify({kind: meta.kind, version: meta.version, output: meta.output,
                               run_id: meta.run_id, rejected: chosen()}, null, 1) + '\\n';
    var url = URL.createObjectURL(new Blob([body], {type: 'application/json'}));
    var link = document.createElement('a');
    link.href = url;
    link.download = 'rejects.json';
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
  });
  show();
})();
"""

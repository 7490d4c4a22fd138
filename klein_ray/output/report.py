"""The job's contact sheet: ``_job/report.html`` and the entries it is built from.

This module owns two things and nothing else:

* ``ContactEntry``: one committed image as the contact sheet shows it (with a small JPEG
  thumbnail, made by the worker: ``worker.encode.make_thumbnail``, and those of the references
  it was made from), plus its pyarrow schema and (de)serialisation, so the driver can keep the
  sheet's entries in ``_job/contact.parquet`` across resumed runs;
* ``build_report``: the HTML page itself, a review sheet (``output.review``): each edit beside
  its references, sections grouped by a column, a Reject button per card and the rejects file.

The page is a single self-contained string: CSS and its one small script inline, thumbnails as
base64 ``data:`` URIs, no external resources, so it opens the same from a laptop, from a
bucket's web view or from an email attachment. Every value from a manifest is escaped; none
reaches the script but as JSON data. Reading and writing storage is the caller's job.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from klein_ray.output.review import (
    NO_GROUP,
    REVIEW_CSS,
    REVIEW_JS,
    attempt_of,
    reference_store,
    references_html,
    superseded,
    toolbar,
)
from klein_ray.types import RowError

# The driver stops adding cards here: 500 thumbnails of ~8 KB keep the page around 5 MB, which
# still opens quickly in a browser; past that the sheet stops being something one scrolls.
MAX_CONTACT_ENTRIES = 500

# Prompts are cut on the card (the full text stays in the title attribute) so cards line up.
PROMPT_CHARS = 120


@dataclass
class ContactEntry:
    """One committed image as shown on the contact sheet."""

    id: str
    prompt: str
    variant: str
    seed: int
    width: int
    height: int
    render_ms: float
    image_key: str
    thumbnail: bytes  # JPEG bytes (worker.encode.make_thumbnail)
    reference_sha256: list[str] = field(default_factory=list)  # the references it was made from
    reference_thumbnails: list[bytes] = field(default_factory=list)  # small JPEGs, in that order


# Field order matches ContactEntry so rows convert with asdict / ContactEntry(**row).
CONTACT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("render_ms", pa.float64(), nullable=False),
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("thumbnail", pa.binary(), nullable=False),
        pa.field("reference_sha256", pa.list_(pa.string())),
        pa.field("reference_thumbnails", pa.list_(pa.binary())),
    ]
)
assert [f.name for f in fields(ContactEntry)] == CONTACT_SCHEMA.names


def entries_to_parquet_bytes(entries: list[ContactEntry]) -> bytes:
    """Serialise entries to a parquet file's bytes (an empty list gives a valid empty file)."""
    table = pa.Table.from_pylist([asdict(e) for e in entries], schema=CONTACT_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def entries_from_parquet_bytes(data: bytes) -> list[ContactEntry]:
    """Read entries written by entries_to_parquet_bytes."""
    table = pq.ParquetFile(io.BytesIO(data)).read()  # read_table's dataset threads abort at exit
    # A file written before the reference columns existed reads with none.
    for name in ("reference_sha256", "reference_thumbnails"):
        if name not in table.column_names:
            table = table.append_column(name, pa.array([[]] * table.num_rows, CONTACT_SCHEMA.field(name).type))
    # Cast so a file written by an older writer with narrower types still reads as this schema.
    table = table.select(CONTACT_SCHEMA.names).cast(CONTACT_SCHEMA)
    return [ContactEntry(**{**row, "reference_sha256": row["reference_sha256"] or [],
                            "reference_thumbnails": row["reference_thumbnails"] or []})
            for row in table.to_pylist()]


_CSS = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#e3e6ec;
  --accent:#3d5afe; --ok:#1e8e5a; --warn:#b26a00; --bad:#c62828; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; }
header { background:linear-gradient(135deg,#1d2330,#2f3b59); color:#fff; padding:28px 32px 24px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .uri { color:#c5cbe0; font-family:ui-monospace,Menlo,Consolas,monospace; font-size:13px;
  word-break:break-all; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(130px,1fr)); gap:12px;
  margin-top:18px; }
.tile { background:rgba(255,255,255,.09); border-radius:10px; padding:10px 14px; }
.tile .v { font-size:24px; font-weight:650; }
.tile .k { font-size:11px; letter-spacing:.08em; text-transform:uppercase; color:#c5cbe0; }
.tile.ok .v { color:#7ee2a8; } .tile.warn .v { color:#ffd27a; } .tile.bad .v { color:#ff9a9a; }
main { padding:20px 32px 40px; max-width:1600px; margin:0 auto; }
.banner { border-radius:10px; padding:12px 16px; margin:0 0 16px; border:1px solid; }
.banner.noise { background:#fff7e0; border-color:#f0c860; color:#6b4a00; font-weight:500; }
.banner.cap { background:#eaf0ff; border-color:#b7c6ff; color:#24367a; }
h2 { font-size:17px; margin:28px 0 12px; }
h2 .count { color:var(--muted); font-weight:400; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(200px,1fr)); gap:14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:12px;
  overflow:hidden; box-shadow:0 1px 2px rgba(20,30,60,.05); display:flex; flex-direction:column; }
.card .pic { background:#e9ebf0; display:flex; align-items:center; justify-content:center;
  aspect-ratio:1/1; }
.card img.thumb { display:block; max-width:100%; max-height:100%; width:auto; height:auto; }
.card .noimg { color:var(--muted); font-size:12px; }
.card .body { padding:10px 12px 12px; display:flex; flex-direction:column; gap:6px; }
.card .id { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px; font-weight:600;
  word-break:break-all; }
.card .prompt { color:#3a4256; font-size:13px; display:-webkit-box; -webkit-line-clamp:3;
  line-clamp:3; -webkit-box-orient:vertical; overflow:hidden; }
.chips { display:flex; flex-wrap:wrap; gap:4px; }
.chip { background:#eef0f5; color:#414a60; border-radius:999px; padding:1px 8px; font-size:11px;
  white-space:nowrap; }
.chip.variant { background:#e6ebff; color:#2a3fb8; }
.empty { color:var(--muted); padding:24px; background:var(--card); border-radius:12px;
  border:1px dashed var(--line); text-align:center; }
table { border-collapse:collapse; width:100%; background:var(--card); border-radius:12px;
  overflow:hidden; border:1px solid var(--line); }
th, td { text-align:left; padding:8px 12px; border-bottom:1px solid var(--line);
  vertical-align:top; }
th { background:#f8f9fb; font-size:12px; text-transform:uppercase; letter-spacing:.05em;
  color:var(--muted); }
td.mono { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px;
  word-break:break-all; }
td.msg { white-space:pre-wrap; word-break:break-word; }
.stage { color:var(--bad); font-weight:600; }
footer { color:var(--muted); font-size:12px; padding:0 32px 28px; text-align:center; }
""" + REVIEW_CSS

NOISE_TEXT = (
    "These images come from a randomly initialised test model: they are noise, which is expected."
)

# Summary keys shown as tiles, in order, with the CSS tone that colours a non-zero value.
_TILES = (
    ("total", "Total rows", ""),
    ("committed", "Committed", "ok"),
    ("skipped", "Skipped", "warn"),
    ("failed", "Failed", "bad"),
    ("seconds", "Seconds", ""),
)


def _e(value: object) -> str:
    """Escape anything for text or a quoted attribute: prompts, ids and messages are user input."""
    return html.escape(str(value), quote=True)


def _fmt_number(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _header(summary: dict, title: str) -> str:
    tiles = []
    for key, label, tone in _TILES:
        value = summary.get(key)
        # A tone only when there is something to draw attention to (e.g. failures > 0).
        cls = f"tile {tone}" if tone and isinstance(value, (int, float)) and value else "tile"
        tiles.append(
            f'<div class="{cls}"><div class="v">{_e(_fmt_number(value))}</div>'
            f'<div class="k">{_e(label)}</div></div>'
        )
    uri = summary.get("output_uri") or summary.get("output") or ""
    uri_html = f'<div class="uri">Output: {_e(uri)}</div>' if uri else ""
    return (
        f"<header><h1>{_e(title)}</h1>{uri_html}"
        f'<div class="tiles">{"".join(tiles)}</div></header>'
    )


def _thumb_size(data: bytes) -> tuple[int, int] | None:
    """The thumbnail's pixel size, or None when it is missing or undecodable."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except Exception:  # noqa: BLE001 - a damaged thumbnail costs one card its picture, not the report
        return None


def _card(entry: ContactEntry, later: str | None = None) -> str:
    size = _thumb_size(entry.thumbnail)
    if size is None:
        pic = '<span class="noimg">no thumbnail</span>'
    else:
        b64 = base64.b64encode(entry.thumbnail).decode("ascii")
        # Eager loading on purpose: a headless browser (and print-to-PDF) must see every image.
        pic = (
            f'<img class="thumb" src="data:image/jpeg;base64,{b64}" alt="{_e(entry.id)}" '
            f'width="{size[0]}" height="{size[1]}" loading="eager" decoding="async">'
        )
    prompt = entry.prompt
    short = prompt if len(prompt) <= PROMPT_CHARS else prompt[: PROMPT_CHARS - 1].rstrip() + "…"
    chips = (
        f'<span class="chip variant">{_e(entry.variant)}</span>'
        f'<span class="chip">seed {_e(entry.seed)}</span>'
        f'<span class="chip">{_e(entry.width)}×{_e(entry.height)}</span>'
        f'<span class="chip">{_e(f"{entry.render_ms:,.0f}")} ms</span>'
    )
    attempt = attempt_of(entry.id)[1]
    if attempt > 1:
        chips += f'<span class="chip attempt">attempt {attempt}</span>'
    if later:
        chips += f'<span class="chip attempt">superseded by {_e(later)}</span>'
    return (
        f'<figure class="card{" superseded" if later else ""}" title="{_e(entry.image_key)}" '
        f'data-id="{_e(entry.id)}" style="margin:0">'
        f'<div class="pic">{pic}</div><figcaption class="body">'
        f'<div class="id">{_e(entry.id)}</div>{references_html(entry)}'
        f'<div class="prompt" title="{_e(prompt)}">{_e(short)}</div>'
        f'<div class="chips">{chips}</div>'
        '<div><button type="button" class="reject" aria-pressed="false">Reject</button></div>'
        "</figcaption></figure>"
    )


def _grid(entries: list[ContactEntry], total_committed: int | None,
          group_by: str | None = None, groups: dict[str, str | None] | None = None) -> str:
    total = len(entries) if total_committed is None else max(total_committed, len(entries))
    parts = [f'<h2>Images <span class="count">({total:,})</span></h2>']
    if total > len(entries):
        parts.append(
            f'<div class="banner cap">Showing {len(entries):,} of {total:,} '
            "committed images; the rest are in the output location.</div>"
        )
    later = superseded([e.id for e in entries])
    if not entries:
        parts.append('<div class="empty">No committed images yet.</div>')
    elif group_by is None:
        parts.append(f'<div class="grid">{"".join(_card(e, later.get(e.id)) for e in entries)}</div>')
    else:
        # Groups and the cards in each in order (a product's shots side by side, attempts
        # after the shot they replace), rows without the column last.
        sections: dict[str, list[ContactEntry]] = {}
        for entry in entries:
            sections.setdefault((groups or {}).get(entry.id) or NO_GROUP, []).append(entry)
        for value in sorted(sections, key=lambda v: (v == NO_GROUP, v)):
            members = sorted(sections[value], key=lambda e: attempt_of(e.id))
            cards = "".join(_card(e, later.get(e.id)) for e in members)
            parts.append(
                f'<section class="group" data-group="{_e(value)}"><h3>{_e(group_by)}: {_e(value)} '
                f'<span class="count">({len(members):,})</span></h3><div class="grid">{cards}</div></section>'
            )
    return "".join(parts)


def _errors_table(errors: list[RowError], total: int | None = None) -> str:
    if not errors:
        return ""
    total = max(total or 0, len(errors))
    more = (f'<p class="count">The first {len(errors):,} of {total:,} failed rows; every one is in '
            "_job/errors.parquet.</p>" if total > len(errors) else "")
    rows = "".join(
        f'<tr><td class="mono">{_e(err.id)}</td><td class="stage">{_e(err.stage)}</td>'
        f'<td class="mono">{_e(err.error_type)}</td><td class="msg">{_e(err.message)}</td>'
        f"<td>{_e(err.attempts)}</td></tr>"
        for err in errors
    )
    return (
        f'<h2 id="failed">Failed rows <span class="count">({total:,})</span></h2>{more}'
        "<table><thead><tr><th>ID</th><th>Stage</th><th>Error type</th><th>Message</th>"
        f"<th>Attempts</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def build_report(
    summary: dict,
    entries: list[ContactEntry],
    errors: list[RowError],
    *,
    total_committed: int | None = None,
    noise_model: bool = False,
    title: str = "klein-ray job report",
    group_by: str | None = None,
    groups: dict[str, str | None] | None = None,
    errors_total: int | None = None,
) -> str:
    """The contact sheet as one self-contained HTML document.

    ``summary`` supplies the header tiles (``total``, ``committed``, ``skipped``, ``failed``,
    ``seconds``), ``output`` (or ``output_uri``) and ``run_id``; missing keys show as a dash.
    ``total_committed`` is the number of committed images when ``entries`` was capped (see
    MAX_CONTACT_ENTRIES). ``group_by``: sections by that column, ``groups`` giving each id's
    value (``output.review.group_value`` of its marker). ``errors_total``: how many rows
    failed when ``errors`` holds only the first of them.
    """
    noise = f'<div class="banner noise">{_e(NOISE_TEXT)}</div>' if noise_model else ""
    output = str(summary.get("output") or summary.get("output_uri") or "")
    review = toolbar(output, str(summary.get("run_id") or "")) if entries else ""
    body = (
        _header(summary, title)
        + f"<main>{noise}{review}{_grid(entries, total_committed, group_by, groups)}"
        + f"{_errors_table(errors, errors_total)}</main>"
        + "<footer>Generated by klein-ray. Thumbnails are embedded; full-size images are in "
        "the output location.</footer>"
    )
    if entries:
        body += f"{reference_store(entries)}<script>{REVIEW_JS}</script>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )

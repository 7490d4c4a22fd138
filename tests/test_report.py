"""The contact sheet: thumbnails, parquet round trip, escaping, the review parts (reference
thumbnails once per reference, groups, attempts, the one script and its data), and how it looks in
a browser. Clicking in it: test_review_browser.py."""

from __future__ import annotations

import html
import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from klein_ray.output.report import (
    CONTACT_SCHEMA,
    NOISE_TEXT,
    ContactEntry,
    build_report,
    entries_from_parquet_bytes,
    entries_to_parquet_bytes,
)
from klein_ray.types import RowError
from klein_ray.worker.encode import make_thumbnail

NASTY = '<script>alert("x")</script> & \'quotes\''

# (width, height, background, shape colour) for fixture images: not model output.
SHAPES = [
    (256, 256, (32, 64, 160), (250, 200, 40)),
    (384, 256, (20, 120, 80), (240, 240, 240)),
    (256, 384, (150, 30, 60), (30, 200, 220)),
    (320, 320, (60, 60, 60), (255, 120, 0)),
    (512, 288, (230, 230, 210), (90, 40, 160)),
    (200, 200, (10, 10, 30), (200, 60, 200)),
]


def fixture_image(i: int, mode: str = "RGB") -> Image.Image:
    w, h, bg, fg = SHAPES[i % len(SHAPES)]
    im = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(im)
    draw.ellipse((w // 6, h // 6, w * 4 // 6, h * 4 // 6), fill=fg)
    draw.rectangle((w // 2, h // 2, w - 10, h - 10), outline=(255, 255, 255), width=4)
    draw.polygon([(10, h - 10), (w // 3, h // 2), (w // 2, h - 10)], fill=fg[::-1])
    return im.convert(mode)


def make_entries(n: int) -> list[ContactEntry]:
    out = []
    for i in range(n):
        im = fixture_image(i)
        prompt = f"a {['cat', 'lighthouse', 'bowl of ramen'][i % 3]} number {i}, studio light"
        if i == 1:
            prompt = NASTY + " " + "very long prompt " * 20
        out.append(
            ContactEntry(
                id=f"row-{i:03d}" if i != 2 else 'row-"<b>2</b>"',
                prompt=prompt,
                variant=["klein-4b", "klein-9b"][i % 2],
                seed=1000 + i,
                width=im.width,
                height=im.height,
                render_ms=123.4 * (i + 1),
                image_key=f"out/row-{i:03d}.png",
                thumbnail=make_thumbnail(im),
            )
        )
    return out


def make_errors() -> list[RowError]:
    return [
        RowError(id="bad-1", stage="fetch", error_type="HTTPError", message="404 for <url>",
                 attempts=3),
        RowError(id="<img src=x onerror=alert(1)>", stage="render", error_type="ValueError",
                 message=NASTY, attempts=1),
    ]


SUMMARY = {
    "total": 9, "committed": 6, "skipped": 1, "failed": 2, "seconds": 12.5,
    "output_uri": "s3://bucket/job?a=1&b=<2>",
}


# ---- thumbnails --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_thumbnail_is_rgb_jpeg_with_aspect_preserved(mode):
    src = fixture_image(4, mode)  # 512x288
    data = make_thumbnail(src, max_side=192)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (192, 108)


def test_thumbnail_never_upscales_and_respects_max_side():
    small = Image.new("RGB", (64, 40), (1, 2, 3))
    with Image.open(io.BytesIO(make_thumbnail(small))) as im:
        assert im.size == (64, 40)
    tall = fixture_image(2)  # 256x384
    with Image.open(io.BytesIO(make_thumbnail(tall, max_side=96))) as im:
        assert im.size == (64, 96)


def test_transparent_areas_become_white_not_black():
    im = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    with Image.open(io.BytesIO(make_thumbnail(im))) as thumb:
        assert min(thumb.getpixel((25, 25))) > 240


# ---- parquet -----------------------------------------------------------------------------------


def test_parquet_round_trip_is_exact():
    entries = make_entries(5)
    data = entries_to_parquet_bytes(entries)
    assert data[:4] == b"PAR1"
    assert entries_from_parquet_bytes(data) == entries


def test_parquet_empty_and_schema():
    assert entries_from_parquet_bytes(entries_to_parquet_bytes([])) == []
    assert CONTACT_SCHEMA.names == [
        "id", "prompt", "variant", "seed", "width", "height", "render_ms", "image_key", "thumbnail",
        "reference_sha256", "reference_thumbnails",
    ]


# ---- HTML --------------------------------------------------------------------------------------


def test_html_is_self_contained_and_escaped():
    entries = make_entries(4)
    page = build_report(SUMMARY, entries, make_errors())
    # The review's own script and its two JSON blocks; user input never makes another.
    assert page.count("<script") == 3 and page.count('<script type="application/json"') == 2
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "404 for &lt;url&gt;" in page
    assert "s3://bucket/job?a=1&amp;b=&lt;2&gt;" in page
    assert 'row-&quot;&lt;b&gt;2&lt;/b&gt;&quot;' in page
    # Nothing is fetched from anywhere: every src is a data: URI and there are no links out.
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert "<link" not in page


def test_img_tags_have_class_alt_size_and_load_eagerly():
    entries = make_entries(3)
    page = build_report(SUMMARY, entries, [])
    imgs = re.findall(r"<img [^>]*>", page)
    assert len(imgs) == 3
    for tag, entry in zip(imgs, entries):
        assert 'class="thumb"' in tag
        assert 'loading="lazy"' not in tag
        with Image.open(io.BytesIO(entry.thumbnail)) as im:
            assert f'width="{im.width}"' in tag and f'height="{im.height}"' in tag
    assert 'alt="row-000"' in imgs[0]


def test_prompt_is_truncated_with_full_text_in_title():
    entries = make_entries(2)
    page = build_report(SUMMARY, entries, [])
    full = entries[1].prompt
    assert len(full) > 200
    assert f'title="{html.escape(full, quote=True)}"' in page
    assert "…" in page


def test_header_tiles_banners_and_failed_section():
    page = build_report(SUMMARY, make_entries(2), make_errors(), total_committed=1234,
                        noise_model=True, title="demo & test")
    for label in ("Total rows", "Committed", "Skipped", "Failed", "Seconds"):
        assert label in page
    assert "12.5" in page and "<title>demo &amp; test</title>" in page
    assert NOISE_TEXT in page
    assert "showing 2 of 1,234 committed images" in page.lower()
    assert "Failed rows" in page and "HTTPError" in page and "<td>3</td>" in page

    plain = build_report({}, make_entries(2), [])
    assert NOISE_TEXT not in plain
    assert "committed images; the rest" not in plain.lower()
    assert "Failed rows" not in plain
    assert "—" in plain  # missing summary values show as a dash rather than crash


def test_empty_report_renders():
    page = build_report(SUMMARY, [], [])
    assert "No committed images yet" in page and "<img" not in page


def test_broken_thumbnail_costs_only_its_picture():
    entries = make_entries(2)
    entries[0].thumbnail = b"not a jpeg"
    page = build_report(SUMMARY, entries, [])
    assert page.count("<img ") == 1 and "no thumbnail" in page


# ---- in a real browser -------------------------------------------------------------------------


def test_report_renders_in_chromium(tmp_path: Path, chromium):
    entries = entries_from_parquet_bytes(entries_to_parquet_bytes(make_entries(len(SHAPES))))
    page = build_report(SUMMARY, entries, make_errors(), total_committed=742, noise_model=True)
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    shot = tmp_path / "report.png"

    seen = chromium(path, screenshot=shot)

    assert seen["images"] == len(entries)
    assert seen["loaded"] == len(entries), seen["broken"]
    assert seen["broken"] == []
    assert seen["title"] == "klein-ray job report"
    assert NOISE_TEXT in seen["text"]
    assert "Showing 6 of 742 committed images" in seen["text"]
    # Escaped user input shows as text, and the onerror payload never became an element.
    assert '<script>alert("x")</script>' in seen["text"]
    assert "<img src=x onerror=alert(1)>" in seen["text"]
    assert shot.stat().st_size > 10_000


# ---- the review parts --------------------------------------------------------------------------


def with_references(entries: list[ContactEntry]) -> list[ContactEntry]:
    """Entries 0 and 1 made from the same photo, entry 2 from it and another, the rest from none."""
    photo, other = make_thumbnail(fixture_image(3), 96), make_thumbnail(fixture_image(5), 96)
    entries[0].reference_sha256, entries[0].reference_thumbnails = ["a" * 64], [photo]
    entries[1].reference_sha256, entries[1].reference_thumbnails = ["a" * 64], [photo]
    entries[2].reference_sha256, entries[2].reference_thumbnails = ["a" * 64, "b" * 64], [photo, other]
    return entries


def test_reference_thumbnails_are_in_the_page_once_per_reference():
    entries = with_references(make_entries(4))
    page = build_report(SUMMARY, entries, [])
    assert page.count('class="ref"') == 4 and page.count('data-ref="' + "a" * 64) == 3
    assert page.count("data:image/jpeg;base64,") == 4 + 2  # four images, two distinct references
    assert entries_from_parquet_bytes(entries_to_parquet_bytes(entries)) == entries


def test_a_contact_sheet_written_before_references_reads_with_none():
    old = pa.Table.from_pylist([{k: v for k, v in asdict(e).items() if not k.startswith("reference")}
                                for e in make_entries(2)])
    sink = io.BytesIO()
    pq.write_table(old, sink)
    read = entries_from_parquet_bytes(sink.getvalue())
    assert [e.reference_sha256 for e in read] == [[], []] and read[0].thumbnail == make_entries(1)[0].thumbnail


def test_groups_attempts_and_what_they_supersede():
    entries = make_entries(4)
    for entry, row_id in zip(entries, ["mug-marble-0", "vase-beach-0", "mug-marble-0.r2", "mug-beach-0"]):
        entry.id = row_id
    groups = {"mug-marble-0": "MUG", "mug-marble-0.r2": "MUG", "mug-beach-0": "MUG"}
    page = build_report(SUMMARY, entries, [], group_by="sku", groups=groups)
    assert re.findall(r'<section class="group" data-group="([^"]+)"', page) == ["MUG", "(none)"]
    assert re.findall(r'data-id="([^"]+)"', page) == ["mug-beach-0", "mug-marble-0", "mug-marble-0.r2",
                                                      "vase-beach-0"]
    assert "attempt 2" in page and "superseded by mug-marble-0.r2" in page
    assert page.count('class="card superseded"') == 1


def test_the_scripts_data_cannot_close_its_block():
    summary = dict(SUMMARY, output="s3://b/</script><script>alert(1)</script>", run_id="<!--")
    page = build_report(summary, make_entries(2), [])
    assert page.count("<script") == 3 and "alert(1)</script>" not in page and "<!--" not in page
    data = re.search(r'<script type="application/json" id="kr-review">(.*?)</script>', page).group(1)
    assert json.loads(data)["output"] == "s3://b/</script><script>alert(1)</script>"

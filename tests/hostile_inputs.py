"""The hostile manifest and its inputs (tests/test_hostile*.py): distinctive secrets, reference
images of every awkward kind (modes, EXIF, truncated, oversized, a decompression bomb), and every
row, good or bad, with the stage, column and message its error must name."""

from __future__ import annotations

import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml
from helpers import MANIFEST_SCHEMA, row, write_manifest
from PIL import Image

# Distinctive secrets: none may appear in any output, stream or file the job writes.
SECRET_KEY = "HOSTILE-aws-secret-9f3c1e77d2"
SESSION_TOKEN = "HOSTILE-session-token-4b8a0c"
URL_PASSWORD = "URLPASSWORD7731"
SIGNED_QUERY = "X-Amz-Signature=SECRETSIG123&X-Amz-Credential=AKIDSECRET"
REDIRECT_SECRET = "REDIRSECRET5521"
SECRETS = (SECRET_KEY, SESSION_TOKEN, URL_PASSWORD, "SECRETSIG123", "AKIDSECRET", REDIRECT_SECRET)

MAX_BYTES = 200_000
MAX_SEQ = 64
PRIVATE_MSG = "loopback, private or link-local"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def save_image(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (200, 200, 200))
    img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), (30, 90, 160)), (size[0] // 4, size[1] // 4))
    return img


def _noise_png(side: int) -> bytes:
    return save_image(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _bomb_png(side: int = 30000) -> bytes:
    """A real, valid 1-bit PNG of side x side pixels (all black): ~110 kB on disk, 900 Mpx
    decoded, far over 2x PIL's MAX_IMAGE_PIXELS (so Pillow raises DecompressionBombError)."""
    row_bytes = 1 + (side + 7) // 8  # filter byte + packed bits
    comp = zlib.compressobj(9)
    zero_rows = b"\x00" * (row_bytes * 256)
    parts = []
    for start in range(0, side, 256):
        n = min(256, side - start)
        parts.append(comp.compress(zero_rows[: n * row_bytes]))
    parts.append(comp.flush())
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # depth 1, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def write_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True)
    files: dict[str, bytes] = {}
    files["rgba.png"] = save_image(Image.new("RGBA", (64, 64), (255, 0, 0, 96)), "PNG")
    pal = pattern().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    files["palette.png"] = save_image(pal, "PNG", transparency=0)
    files["cmyk.jpg"] = save_image(Image.new("CMYK", (64, 64), (0, 160, 200, 20)), "JPEG")
    i16 = Image.new("I;16", (64, 64), 40000)
    i16.paste(Image.new("I;16", (32, 32), 1000), (16, 16))
    files["gray16.png"] = save_image(i16, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    files["exif6.jpg"] = save_image(pattern((96, 64)), "JPEG", exif=exif.tobytes())
    files["ok.png"] = save_image(pattern(), "PNG")
    files["text.png"] = b"this is not an image, whatever its name says\n"
    noise = _noise_png(64)
    files["truncated.png"] = noise[: len(noise) // 2]
    files["oversized.png"] = _noise_png(320)  # ~300 kB, a valid image: only its size is wrong
    files["bomb.png"] = _bomb_png()
    files["tiny40.png"] = save_image(pattern((40, 40)), "PNG")
    files["wide.png"] = save_image(pattern((1000, 100)), "PNG")
    paths = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        paths[name] = d / name
    # The fixtures are what they claim to be.
    assert Image.open(paths["gray16.png"]).mode == "I;16"
    assert Image.open(paths["palette.png"]).mode == "P"
    assert Image.open(paths["cmyk.jpg"]).mode == "CMYK"
    assert Image.open(paths["exif6.jpg"]).getexif()[0x0112] == 6
    assert len(files["oversized.png"]) > MAX_BYTES + 50_000
    assert len(files["bomb.png"]) < MAX_BYTES  # refused for its pixels, not its bytes
    return paths


# ---------------------------------------------------------------------------------------------
# The hostile manifest
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    file: str  # manifest file name (a.parquet / b.parquet)
    index: int  # row index within that file
    raw: dict
    stage: str | None = None  # None: a good row
    column: str | None = None
    needles: tuple[str, ...] = ()  # substrings of the recorded message (or error type)

    @property
    def good(self) -> bool:
        return self.stage is None

    @property
    def name(self) -> str:
        return f"{self.file}:{self.index}:{self.raw.get('id')!r}"[:60]


# b.parquet: seed as uint64, so a seed above 2^63-1 can be written at all.
SCHEMA_B = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int32()),
                      ("height", pa.int32()), ("seed", pa.uint64())])

LONG_PROMPT = ("A photorealistic studio photograph of a mid-century brass desk lamp with a green "
               "glass shade, soft rim light, shallow depth of field, catalogue style. ") * 12
HTML_PROMPT = "<script>alert('pwn')</script><img src=x onerror=alert(1)> lamp \u202e\u0000 \U0001f3a8"


SQ = dict(width=64, height=64)  # every row renders 64x64
Spec = tuple  # (row, its stage when bad or None, its column, needles of its message)


def _good_rows(inp: dict[str, Path]) -> list[Spec]:
    return [
        (row(id="good-t2i", prompt="a lamp", seed=1, **SQ), None, None, ()),
        (row(id="good-seed-max", prompt="a chair", seed=2**63 - 1, format="webp", **SQ), None, None, ()),
        (row(id="g" + "x" * 127, prompt="a 128-character id", format="jpeg", **SQ), None, None, ()),
        (row(id="good-html-prompt", prompt=HTML_PROMPT, sku="<b>sku</b>", **SQ), None, None, ()),
        (row(id="good-long-prompt", prompt=LONG_PROMPT, **SQ), None, None, ()),
        # "None" is a valid id; a row with a null id must not make it a duplicate.
        (row(id="None", prompt="an id that spells None", **SQ), None, None, ()),
        (row(id="good-rgba", prompt="edit", references=[str(inp["rgba.png"])], **SQ), None, None, ()),
        # The same file by a relative path (resolved against the CWD) and by file://.
        (row(id="good-relative", prompt="edit", references=["../inputs/rgba.png"], **SQ), None, None, ()),
        (row(id="good-palette", prompt="edit", references=[str(inp["palette.png"])], **SQ), None, None, ()),
        (row(id="good-cmyk", prompt="edit", references=[inp["cmyk.jpg"].as_uri()], **SQ), None, None, ()),
        (row(id="good-gray16", prompt="edit", references=[str(inp["gray16.png"])], **SQ), None, None, ()),
        (row(id="good-exif6", prompt="edit", references=[str(inp["exif6.jpg"])], **SQ), None, None, ()),
    ]


def _bad_field_rows() -> list[Spec]:
    """Bad ids, then bad prompt, geometry, sampling, variant and format: refused at validation."""
    return [
        (row(id="a/b", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="../escape", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="..", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="has space", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="", prompt="x", **SQ), "validate", "id", ("empty",)),
        (row(id=None, prompt="x", **SQ), "validate", "id", ("empty",)),
        (row(id="y" * 129, prompt="x", **SQ), "validate", "id", ("129 characters",)),
        (row(id="bad\nnewline", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="\x1b[31mred", prompt="x", **SQ), "validate", "id", ("must match",)),
        (row(id="dup", prompt="first", **SQ), "validate", "id", ("DuplicateId",)),
        (row(id="dup", prompt="second", **SQ), "validate", "id", ("DuplicateId",)),
        (row(id="null-prompt", prompt=None, **SQ), "validate", "prompt", ("empty",)),
        (row(id="blank-prompt", prompt=" \t\n\u3000", **SQ), "validate", "prompt", ("empty",)),
        (row(id="width-100", prompt="x", width=100, height=64), "validate", "width", ("multiple of 16",)),
        (row(id="height-4096", prompt="x", width=64, height=4096), "validate", "height", ("[64, 2048]",)),
        (row(id="width-32", prompt="x", width=32, height=64), "validate", "width", ("[64, 2048]",)),
        (row(id="steps-0", prompt="x", steps=0, **SQ), "validate", "steps", ("steps",)),
        (row(id="steps-neg", prompt="x", steps=-1, **SQ), "validate", "steps", ("steps",)),
        (row(id="seed-neg", prompt="x", seed=-1, **SQ), "validate", "seed", ("seed",)),
        (row(id="guidance-nan", prompt="x", guidance=math.nan, **SQ), "validate", "guidance", ("guidance",)),
        (row(id="guidance-inf", prompt="x", guidance=math.inf, **SQ), "validate", "guidance", ("guidance",)),
        (row(id="guidance-1e9", prompt="x", guidance=1e9, **SQ), "validate", "guidance", ("guidance",)),
        (row(id="ghost-variant", prompt="x", variant="nope", **SQ), "validate", "variant", ("unknown variant",)),
        (row(id="gif-format", prompt="x", format="gif", **SQ), "validate", "format", ("unknown format",)),
    ]


def _bad_reference_rows(inp: dict[str, Path]) -> list[Spec]:
    """Bad reference lists (validation), references that fail when fetched or decoded, and
    references the model cannot use (per-row errors, not batch crashes)."""
    return [
        (row(id="too-many-refs", prompt="x", references=[str(inp["ok.png"])] * 3, **SQ),
         "validate", "references", ("at most 2",)),
        (row(id="ftp-ref", prompt="x", references=["ftp://example.com/a.png"], **SQ),
         "validate", "references", ("unsupported reference scheme",)),
        (row(id="empty-ref", prompt="x", references=[""], **SQ), "validate", "references", ("empty",)),
        (row(id="null-ref", prompt="x", references=[None], **SQ), "validate", "references", ("empty",)),
        (row(id="missing-ref", prompt="x", references=[str(inp["ok.png"].parent / "nope.png")], **SQ),
         "fetch", None, ("nope.png does not exist",)),
        (row(id="dir-ref", prompt="x", references=[str(inp["ok.png"].parent)], **SQ),
         "fetch", None, ("not a regular file",)),
        (row(id="text-as-png", prompt="x", references=[str(inp["text.png"])], **SQ),
         "fetch", None, ("not a readable image",)),
        (row(id="truncated-png", prompt="x", references=[str(inp["truncated.png"])], **SQ),
         "fetch", None, ("not a readable image",)),
        (row(id="oversized-ref", prompt="x", references=[str(inp["oversized.png"])], **SQ),
         "fetch", None, (f"larger than {MAX_BYTES} bytes",)),
        (row(id="dev-zero-ref", prompt="x", references=["/dev/zero"], **SQ),
         "fetch", None, ("not a regular file",)),  # a device is never read, capped or not
        (row(id="bomb-ref", prompt="x", references=[str(inp["bomb.png"])], **SQ),
         "fetch", None, ("too large to decode safely",)),
        (row(id="outside-roots-ref", prompt="x", references=["/etc/passwd"], **SQ),
         "fetch", None, ("is outside references.local_roots", "add its directory")),
        (row(id="tiny-ref", prompt="x", references=[str(inp["tiny40.png"])], **SQ),
         "render", None, ("40x40", "at least 64")),
        (row(id="wide-ref", prompt="x", references=[str(inp["wide.png"])], **SQ),
         "render", None, ("1000x100", "aspect ratio")),
    ]


def _network_rows(p: int, p6: int) -> list[Spec]:
    """http(s) references refused before any connection (``p``, ``p6``: the recorders' ports)."""
    return [
        (row(id="net-loopback", prompt="x", references=[f"http://127.0.0.1:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-localhost", prompt="x", references=[f"http://localhost:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-metadata", prompt="x", references=["http://169.254.169.254/latest/meta-data/"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-ipv6-loopback", prompt="x", references=[f"http://[::1]:{p6}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-v4mapped", prompt="x", references=[f"http://[::ffff:127.0.0.1]:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-unspecified", prompt="x", references=[f"http://0.0.0.0:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-hex", prompt="x", references=[f"http://0x7f000001:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-decimal", prompt="x", references=[f"http://2130706433:{p}/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-userinfo", prompt="x",
             references=[f"http://admin:{URL_PASSWORD}@127.0.0.1:{p}/ok.png?{SIGNED_QUERY}"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-private", prompt="x", references=["http://10.0.0.1/ok.png"], **SQ),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-unresolvable", prompt="x", references=["http://does-not-exist.invalid/ok.png"], **SQ),
         "fetch", None, ("does not resolve",)),
    ]


def hostile_cases(inp: dict[str, Path], port: int, port6: int) -> list[Case]:
    """Every case of the hostile manifest, a.parquet (the manifest schema) and b.parquet (uint64
    seeds); ``port``, ``port6``: the recording servers' on 127.0.0.1 and ::1."""
    a = _good_rows(inp) + _bad_field_rows() + _bad_reference_rows(inp) + _network_rows(port, port6)
    cases = [Case("a.parquet", i, raw, stage, col, needles) for i, (raw, stage, col, needles) in enumerate(a)]
    b = [
        ({"id": "good-uint64-seed", "prompt": "a stool", "width": 64, "height": 64, "seed": 12345},
         None, None, ()),
        ({"id": "seed-too-big", "prompt": "x", "width": 64, "height": 64, "seed": 2**64 - 1},
         "validate", "seed", ("seed",)),
    ]
    cases += [Case("b.parquet", i, raw, stage, col, needles) for i, (raw, stage, col, needles) in enumerate(b)]
    return cases


def write_manifest_dir(d: Path, cases: list[Case], only_good: bool = False) -> Path:
    d.mkdir(parents=True)
    for name, schema in (("a.parquet", MANIFEST_SCHEMA), ("b.parquet", SCHEMA_B)):
        rows = [c.raw for c in cases if c.file == name and (c.good or not only_good)]
        write_manifest(d / name, rows, schema=schema)
    return d


def write_job(path: Path, models: dict[str, Path], **references) -> Path:
    cfg = {
        "default_variant": "tiny",
        "variants": {"tiny": {"source": str(models["tiny"]), "pipeline": "distilled", "actors": 1,
                              "batch_size": 4, "max_sequence_length": MAX_SEQ}},
        "references": {"max_count": 2, "max_bytes": MAX_BYTES, "timeout": 10, **references},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# The cases as test ids, before any file or server exists (paths and ports are placeholders).
ALL_CASES = [c for c in hostile_cases({k: Path("/x") / k for k in (
    "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "exif6.jpg", "ok.png", "text.png", "truncated.png",
    "oversized.png", "bomb.png", "tiny40.png", "wide.png")}, 1, 1)]
GOOD_IDS = [c.raw["id"] for c in ALL_CASES if c.good]
BAD_KEYS = [(c.file, c.index) for c in ALL_CASES if not c.good]
BAD_NAMES = [c.name for c in ALL_CASES if not c.good]

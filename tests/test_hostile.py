"""Hostile input, end to end (issue "Hostile input").

"A manifest mixing good rows with every kind of bad row renders the good rows, records each bad
one in the errors table with its reason, exits 1, writes nothing outside OUT, makes no request
to a refused address, and prints no secret; `validate` on it names every bad row and exits 2."

One hostile manifest (a directory of two Parquet files) is rendered ONCE (module fixture) on the
session's Ray, with local HTTP servers on 127.0.0.1, ::1 and 127.0.0.2 that record every request
they receive. A second, small render opens 127.0.0.1 through `references.allow_private_hosts`
and checks redirects, size caps over HTTP and signed-URL redaction. The tests then assert on the
outputs, the errors table, the servers' request logs, the file tree and `klein-ray validate`.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import math
import os
import re
import socket
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from helpers import MANIFEST_SCHEMA, assert_done, last_json, row, run_cli, write_manifest
from klein_ray.storage import LocalStore

pytestmark = pytest.mark.slow

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

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pattern(size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (200, 200, 200))
    img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), (30, 90, 160)), (size[0] // 4, size[1] // 4))
    return img


def _noise_png(side: int) -> bytes:
    return _save(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)), "PNG")


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


def _write_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True)
    files: dict[str, bytes] = {}
    files["rgba.png"] = _save(Image.new("RGBA", (64, 64), (255, 0, 0, 96)), "PNG")
    pal = _pattern().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    files["palette.png"] = _save(pal, "PNG", transparency=0)
    files["cmyk.jpg"] = _save(Image.new("CMYK", (64, 64), (0, 160, 200, 20)), "JPEG")
    i16 = Image.new("I;16", (64, 64), 40000)
    i16.paste(Image.new("I;16", (32, 32), 1000), (16, 16))
    files["gray16.png"] = _save(i16, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    files["exif6.jpg"] = _save(_pattern((96, 64)), "JPEG", exif=exif.tobytes())
    files["ok.png"] = _save(_pattern(), "PNG")
    files["text.png"] = b"this is not an image, whatever its name says\n"
    noise = _noise_png(64)
    files["truncated.png"] = noise[: len(noise) // 2]
    files["oversized.png"] = _noise_png(320)  # ~300 kB, a valid image: only its size is wrong
    files["bomb.png"] = _bomb_png()
    files["tiny40.png"] = _save(_pattern((40, 40)), "PNG")
    files["wide.png"] = _save(_pattern((1000, 100)), "PNG")
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
# Recording HTTP servers
# ---------------------------------------------------------------------------------------------

STREAM_BYTES = 64 * 1024 * 1024


class Recorder:
    """A threaded HTTP server that logs every request (and every connection) it gets."""

    def __init__(self, host: str, port: int = 0, routes: dict | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        recorder = self
        self.requests: list[str] = []
        self.connections = 0
        self.stream_sent = 0
        self.routes = routes or {}
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                with recorder.lock:
                    recorder.connections += 1
                super().setup()

            def log_message(self, *args):
                pass

            def do_GET(self):
                with recorder.lock:
                    recorder.requests.append(self.path)
                route = recorder.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self, recorder)

        class Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def mark(self) -> int:
        return len(self.requests)

    def since(self, mark: int) -> list[str]:
        return self.requests[mark:]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _send_bytes(data: bytes, content_type="image/png"):
    def route(h, _rec):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def _redirect(location: str):
    def route(h, _rec):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def _declared_big(h, _rec):
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Content-Length", str(STREAM_BYTES))
    h.end_headers()
    try:
        chunk = b"\x00" * 65536
        for _ in range(STREAM_BYTES // len(chunk)):
            h.wfile.write(chunk)
    except OSError:
        pass


def _stream_big(h, rec):
    """No Content-Length: only a cap applied while reading can stop this."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.send_header("Connection", "close")
    h.end_headers()
    chunk = os.urandom(65536)
    try:
        for _ in range(STREAM_BYTES // len(chunk)):
            h.wfile.write(chunk)
            with rec.lock:
                rec.stream_sent += len(chunk)
    except OSError:
        pass
    h.close_connection = True


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


def _cases(inp: dict[str, Path], lo: Recorder, lo6: Recorder) -> list[Case]:
    p, p6 = lo.port, lo6.port
    sq = dict(width=64, height=64)
    a: list[tuple[dict, str | None, str | None, tuple]] = [
        # --- good rows ----------------------------------------------------------------
        (row(id="good-t2i", prompt="a lamp", seed=1, **sq), None, None, ()),
        (row(id="good-seed-max", prompt="a chair", seed=2**63 - 1, format="webp", **sq), None, None, ()),
        (row(id="g" + "x" * 127, prompt="a 128-character id", format="jpeg", **sq), None, None, ()),
        (row(id="good-html-prompt", prompt=HTML_PROMPT, sku="<b>sku</b>", **sq), None, None, ()),
        (row(id="good-long-prompt", prompt=LONG_PROMPT, **sq), None, None, ()),
        # "None" is a valid id; a row with a null id must not make it a duplicate.
        (row(id="None", prompt="an id that spells None", **sq), None, None, ()),
        (row(id="good-rgba", prompt="edit", references=[str(inp["rgba.png"])], **sq), None, None, ()),
        # The same file by a relative path (resolved against the CWD) and by file://.
        (row(id="good-relative", prompt="edit", references=["../inputs/rgba.png"], **sq), None, None, ()),
        (row(id="good-palette", prompt="edit", references=[str(inp["palette.png"])], **sq), None, None, ()),
        (row(id="good-cmyk", prompt="edit", references=[inp["cmyk.jpg"].as_uri()], **sq), None, None, ()),
        (row(id="good-gray16", prompt="edit", references=[str(inp["gray16.png"])], **sq), None, None, ()),
        (row(id="good-exif6", prompt="edit", references=[str(inp["exif6.jpg"])], **sq), None, None, ()),
        # --- bad ids -----------------------------------------------------------------------
        (row(id="a/b", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="../escape", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="..", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="has space", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="", prompt="x", **sq), "validate", "id", ("empty",)),
        (row(id=None, prompt="x", **sq), "validate", "id", ("empty",)),
        (row(id="y" * 129, prompt="x", **sq), "validate", "id", ("129 characters",)),
        (row(id="bad\nnewline", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="\x1b[31mred", prompt="x", **sq), "validate", "id", ("must match",)),
        (row(id="dup", prompt="first", **sq), "validate", "id", ("DuplicateId",)),
        (row(id="dup", prompt="second", **sq), "validate", "id", ("DuplicateId",)),
        # --- bad prompt, geometry, sampling, variant, format ---------------------------
        (row(id="null-prompt", prompt=None, **sq), "validate", "prompt", ("empty",)),
        (row(id="blank-prompt", prompt=" \t\n\u3000", **sq), "validate", "prompt", ("empty",)),
        (row(id="width-100", prompt="x", width=100, height=64), "validate", "width", ("multiple of 16",)),
        (row(id="height-4096", prompt="x", width=64, height=4096), "validate", "height", ("[64, 2048]",)),
        (row(id="width-32", prompt="x", width=32, height=64), "validate", "width", ("[64, 2048]",)),
        (row(id="steps-0", prompt="x", steps=0, **sq), "validate", "steps", ("steps",)),
        (row(id="steps-neg", prompt="x", steps=-1, **sq), "validate", "steps", ("steps",)),
        (row(id="seed-neg", prompt="x", seed=-1, **sq), "validate", "seed", ("seed",)),
        (row(id="guidance-nan", prompt="x", guidance=math.nan, **sq), "validate", "guidance", ("guidance",)),
        (row(id="guidance-inf", prompt="x", guidance=math.inf, **sq), "validate", "guidance", ("guidance",)),
        (row(id="guidance-1e9", prompt="x", guidance=1e9, **sq), "validate", "guidance", ("guidance",)),
        (row(id="ghost-variant", prompt="x", variant="nope", **sq), "validate", "variant", ("unknown variant",)),
        (row(id="gif-format", prompt="x", format="gif", **sq), "validate", "format", ("unknown format",)),
        # --- bad reference lists -------------------------------------------------------
        (row(id="too-many-refs", prompt="x", references=[str(inp["ok.png"])] * 3, **sq),
         "validate", "references", ("at most 2",)),
        (row(id="ftp-ref", prompt="x", references=["ftp://example.com/a.png"], **sq),
         "validate", "references", ("unsupported reference scheme",)),
        (row(id="empty-ref", prompt="x", references=[""], **sq), "validate", "references", ("empty",)),
        (row(id="null-ref", prompt="x", references=[None], **sq), "validate", "references", ("empty",)),
        # --- references that fail when fetched or decoded -------------------------------
        (row(id="missing-ref", prompt="x", references=[str(inp["ok.png"].parent / "nope.png")], **sq),
         "fetch", None, ("FileNotFoundError",)),
        (row(id="dir-ref", prompt="x", references=[str(inp["ok.png"].parent)], **sq),
         "fetch", None, ("not a regular file",)),
        (row(id="text-as-png", prompt="x", references=[str(inp["text.png"])], **sq),
         "fetch", None, ("not a readable image",)),
        (row(id="truncated-png", prompt="x", references=[str(inp["truncated.png"])], **sq),
         "fetch", None, ("not a readable image",)),
        (row(id="oversized-ref", prompt="x", references=[str(inp["oversized.png"])], **sq),
         "fetch", None, (f"larger than {MAX_BYTES} bytes",)),
        (row(id="dev-zero-ref", prompt="x", references=["/dev/zero"], **sq),
         "fetch", None, ("not a regular file",)),  # a device is never read, capped or not
        (row(id="bomb-ref", prompt="x", references=[str(inp["bomb.png"])], **sq),
         "fetch", None, ("too large to decode safely",)),
        (row(id="outside-roots-ref", prompt="x", references=["/etc/passwd"], **sq),
         "fetch", None, ("is outside references.local_roots", "add its directory")),
        # --- references the model cannot use: per-row errors, not batch crashes ---------
        (row(id="tiny-ref", prompt="x", references=[str(inp["tiny40.png"])], **sq),
         "render", None, ("40x40", "at least 64")),
        (row(id="wide-ref", prompt="x", references=[str(inp["wide.png"])], **sq),
         "render", None, ("1000x100", "aspect ratio")),
        # --- network: refused before any connection --------------------------------------
        (row(id="net-loopback", prompt="x", references=[f"http://127.0.0.1:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-localhost", prompt="x", references=[f"http://localhost:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-metadata", prompt="x", references=["http://169.254.169.254/latest/meta-data/"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-ipv6-loopback", prompt="x", references=[f"http://[::1]:{p6}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-v4mapped", prompt="x", references=[f"http://[::ffff:127.0.0.1]:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-unspecified", prompt="x", references=[f"http://0.0.0.0:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-hex", prompt="x", references=[f"http://0x7f000001:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-decimal", prompt="x", references=[f"http://2130706433:{p}/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-userinfo", prompt="x",
             references=[f"http://admin:{URL_PASSWORD}@127.0.0.1:{p}/ok.png?{SIGNED_QUERY}"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-private", prompt="x", references=["http://10.0.0.1/ok.png"], **sq),
         "fetch", None, (PRIVATE_MSG,)),
        (row(id="net-unresolvable", prompt="x", references=["http://does-not-exist.invalid/ok.png"], **sq),
         "fetch", None, ("does not resolve",)),
    ]
    cases = [Case("a.parquet", i, raw, stage, col, needles) for i, (raw, stage, col, needles) in enumerate(a)]
    b = [
        ({"id": "good-uint64-seed", "prompt": "a stool", "width": 64, "height": 64, "seed": 12345},
         None, None, ()),
        ({"id": "seed-too-big", "prompt": "x", "width": 64, "height": 64, "seed": 2**64 - 1},
         "validate", "seed", ("seed",)),
    ]
    cases += [Case("b.parquet", i, raw, stage, col, needles) for i, (raw, stage, col, needles) in enumerate(b)]
    return cases


def _write_manifest_dir(d: Path, cases: list[Case], only_good: bool = False) -> Path:
    d.mkdir(parents=True)
    for name, schema in (("a.parquet", MANIFEST_SCHEMA), ("b.parquet", SCHEMA_B)):
        rows = [c.raw for c in cases if c.file == name and (c.good or not only_good)]
        write_manifest(d / name, rows, schema=schema)
    return d


def _write_job(path: Path, models: dict[str, Path], **references) -> Path:
    cfg = {
        "default_variant": "tiny",
        "variants": {"tiny": {"source": str(models["tiny"]), "pipeline": "distilled", "actors": 1,
                              "batch_size": 4, "max_sequence_length": MAX_SEQ}},
        "references": {"max_count": 2, "max_bytes": MAX_BYTES, "timeout": 10, **references},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            # The session's Ceph (if another test started it) logs on its own: not ours to judge.
            dirnames[:] = [d for d in dirnames if not d.startswith("ceph")]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p)] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return out


def _tmp_escapes() -> set[str]:
    # Other sessions share /tmp: only names an escaping id could have produced are checked here;
    # the job's own temporary files go to a TMPDIR inside the snapshotted tree.
    return {n for n in os.listdir("/tmp") if "escape" in n.lower()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _secret_env(tmpdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_SESSION_TOKEN=SESSION_TOKEN)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def _leaks_in_tree(root: Path) -> dict[str, list[str]]:
    found = {}
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        text = data.decode("latin-1")
        if p.suffix == ".parquet":  # values may be compressed: read them back too
            text += json.dumps(pq.read_table(p).to_pylist(), default=str)
        hits = _leaks(text)
        if hits:
            found[str(p)] = hits
    return found


# ---------------------------------------------------------------------------------------------
# Fixtures: one hostile render, one allow-list render
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers():
    lo = Recorder("127.0.0.1")
    try:
        lo6 = Recorder("::1", lo.port)  # same port, so any ::1 connection would be logged
    except OSError:
        lo6 = Recorder("::1")
    lo2 = Recorder("127.0.0.2")
    yield SimpleNamespace(lo=lo, lo6=lo6, lo2=lo2)
    for s in (lo, lo6, lo2):
        s.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_models, ray_address, servers):
    root = tmp_path_factory.mktemp("hostile")
    inp = _write_inputs(root / "inputs")
    ok_png = inp["ok.png"].read_bytes()
    for s in (servers.lo, servers.lo6, servers.lo2):
        s.routes["/ok.png"] = _send_bytes(ok_png)
        s.routes["/x.png"] = _send_bytes(ok_png)
    cases = _cases(inp, servers.lo, servers.lo6)
    manifest = _write_manifest_dir(root / "manifest", cases)
    good_manifest = _write_manifest_dir(root / "good-manifest", cases, only_good=True)
    # The references live beside the manifest directory, not in it (the default root); /dev is
    # allowed so that the device row below is refused for what it is, not for where it is.
    config = _write_job(root / "job.yaml", tiny_models, local_roots=[str(inp["ok.png"].parent), "/dev"])
    cwd, tmpdir = root / "cwd", root / "tmpdir"
    cwd.mkdir()
    tmpdir.mkdir()
    out = root / "out"

    base = tmp_path_factory.getbasetemp()
    before, tmp_before = _tree(base), _tmp_escapes()
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    conns = {n: getattr(servers, n).connections for n in ("lo", "lo6", "lo2")}
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress", env=_secret_env(tmpdir), cwd=cwd, timeout=400)
    after, tmp_after = _tree(base), _tmp_escapes()
    return SimpleNamespace(
        root=root, base=base, inp=inp, cases=cases, manifest=manifest, good_manifest=good_manifest,
        config=config, cwd=cwd, tmpdir=tmpdir, out=out, proc=proc, store=LocalStore(out),
        changed=_changed(before, after), tmp_new=tmp_after - tmp_before,
        requests={n: getattr(servers, n).since(m) for n, m in marks.items()},
        connections={n: getattr(servers, n).connections - conns[n] for n in conns},
    )


def _errors(out: Path) -> list[dict]:
    return pq.read_table(out / "_job" / "errors.parquet").to_pylist()


def _error_for(errors: list[dict], case: Case) -> list[dict]:
    return [e for e in errors if Path(e["manifest_file"]).name == case.file and e["manifest_row"] == case.index]


ALL_CASES = [c for c in _cases({k: Path("/x") / k for k in (
    "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "exif6.jpg", "ok.png", "text.png", "truncated.png",
    "oversized.png", "bomb.png", "tiny40.png", "wide.png")}, SimpleNamespace(port=1), SimpleNamespace(port=1))]
GOOD_IDS = [c.raw["id"] for c in ALL_CASES if c.good]
BAD_KEYS = [(c.file, c.index) for c in ALL_CASES if not c.good]
BAD_NAMES = [c.name for c in ALL_CASES if not c.good]


# ---------------------------------------------------------------------------------------------
# The hostile render
# ---------------------------------------------------------------------------------------------

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
        [e for e in _errors(hostile.out) if e["id"] in missing])
    assert (summary["committed"], summary["failed"]) == (len(good), len(bad)), summary


@pytest.mark.parametrize("row_id", GOOD_IDS)
def test_good_row_is_done(hostile, row_id):
    assert (hostile.out / "meta" / f"{row_id}.json").is_file(), (
        f"{row_id!r} was not rendered; its error records: "
        f"{[e for e in _errors(hostile.out) if e['id'] == row_id]}")
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
    records = _error_for(_errors(hostile.out), case)
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
    assert not _leaks(proc.stdout + proc.stderr), _leaks(proc.stdout + proc.stderr)
    assert not _leaks_in_tree(hostile.out), _leaks_in_tree(hostile.out)


def test_status_counts_from_storage(hostile):
    proc = run_cli("status", str(hostile.out))
    good = sum(c.good for c in hostile.cases)
    assert last_json(proc.stdout) == {"committed": good, "failed": len(hostile.cases) - good, "remaining": 0,
                                      "foreign": 0, "unreadable": 0}


# ---------------------------------------------------------------------------------------------
# Allow-listed internal host: redirects re-checked, size cap while reading, redaction
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def allowed(hostile, tiny_models, ray_address, servers, tmp_path_factory):
    lo, lo2 = servers.lo, servers.lo2
    root = tmp_path_factory.mktemp("allowlist")
    lo.routes.update({
        "/img.png": _send_bytes(_save(_pattern((80, 64)), "PNG")),
        "/redirect-ok": _redirect("/ok.png"),
        "/redirect-metadata": _redirect(f"http://169.254.169.254/latest/meta-data/?X-Amz-Signature={REDIRECT_SECRET}"),
        "/redirect-lo2": _redirect(f"http://127.0.0.2:{lo2.port}/x.png"),
        "/loop": _redirect("/loop"),
        "/redirect-ftp": _redirect(f"ftp://127.0.0.1:{lo.port}/ok.png"),
        "/big-declared": _declared_big,
        "/big-stream": _stream_big,
    })
    base = f"http://127.0.0.1:{lo.port}"
    sq = dict(width=64, height=64)
    rows = [
        row(id="allowed-plain", prompt="edit", references=[f"{base}/ok.png"], **sq),
        row(id="allowed-signed", prompt="edit", references=[f"{base}/img.png?{SIGNED_QUERY}"], **sq),
        row(id="allowed-redirect", prompt="edit", references=[f"{base}/redirect-ok"], **sq),
        row(id="redirect-to-metadata", prompt="x", references=[f"{base}/redirect-metadata"], **sq),
        row(id="redirect-to-other-loopback", prompt="x", references=[f"{base}/redirect-lo2"], **sq),
        row(id="redirect-loop", prompt="x", references=[f"{base}/loop"], **sq),
        # A redirect to a scheme references may not use is refused, not fetched as http.
        row(id="redirect-to-ftp", prompt="x", references=[f"{base}/redirect-ftp"], **sq),
        row(id="http-404", prompt="x", references=[f"{base}/missing.png?{SIGNED_QUERY}"], **sq),
        row(id="big-declared", prompt="x", references=[f"{base}/big-declared"], **sq),
        row(id="big-stream", prompt="x", references=[f"{base}/big-stream"], **sq),
    ]
    manifest = write_manifest(root / "allow.parquet", rows)
    config = _write_job(root / "job.yaml", tiny_models, allow_private_hosts=["127.0.0.1"])
    out = root / "out"
    before = _tree(root)
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    conns2 = lo2.connections
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress", env=_secret_env(), cwd=hostile.cwd, timeout=300)
    return SimpleNamespace(
        root=root, manifest=manifest, config=config, out=out, proc=proc, store=LocalStore(out), base=base,
        changed=_changed(before, _tree(root)),
        requests={n: getattr(servers, n).since(m) for n, m in marks.items()},
        lo2_connections=lo2.connections - conns2, stream_sent=lo.stream_sent,
    )


ALLOWED_GOOD = {"allowed-plain", "allowed-signed", "allowed-redirect"}
ALLOWED_BAD = {"redirect-to-metadata", "redirect-to-other-loopback", "redirect-loop", "redirect-to-ftp",
               "http-404", "big-declared", "big-stream"}


def test_allowlist_render_summary(allowed):
    proc = allowed.proc
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = last_json(proc.stdout)
    committed = {p.stem for p in (allowed.out / "meta").glob("*.json")}
    assert committed == ALLOWED_GOOD, f"committed {sorted(committed)}, expected {sorted(ALLOWED_GOOD)}"
    assert (summary["committed"], summary["failed"]) == (len(ALLOWED_GOOD), len(ALLOWED_BAD)), summary


def test_redirect_to_a_non_http_scheme_is_refused(allowed):
    errors = {e["id"]: e for e in _errors(allowed.out)}
    assert "redirect-to-ftp" in errors, (
        "a 302 to ftp://127.0.0.1:PORT/ok.png was followed as plain http (the row rendered); "
        "redirects must be limited to http(s)")
    assert errors["redirect-to-ftp"]["stage"] == "fetch"


def test_allowlisted_host_renders_and_redirects_are_rechecked(allowed):
    proc = allowed.proc
    assert proc.returncode == 1, proc.stderr[-4000:]
    for row_id in ("allowed-plain", "allowed-signed", "allowed-redirect"):
        assert_done(allowed.store, row_id)
    errors = {e["id"]: e for e in _errors(allowed.out)}
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
    errors = {e["id"]: e for e in _errors(allowed.out)}
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
    assert not _leaks(proc.stdout + proc.stderr), _leaks(proc.stdout + proc.stderr)
    assert not _leaks_in_tree(allowed.out), _leaks_in_tree(allowed.out)
    outside = sorted(p for p in allowed.changed if not p.startswith(str(allowed.out)))
    assert not outside, outside


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------

LINE = re.compile(r"^(?P<file>.*): row (?P<row>\d+) id=(?P<id>.*?) column=(?P<column>\S+): (?P<message>.*)$")


def _validate(hostile, servers, *args, manifest=None, config=None):
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    proc = run_cli("validate", str(manifest or hostile.manifest), "--config", str(config or hostile.config),
                   *args, env=_secret_env(), cwd=hostile.cwd, timeout=300)
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
    assert not _leaks(proc.stdout + proc.stderr)


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
    assert not _leaks(proc.stdout + proc.stderr), _leaks(proc.stdout + proc.stderr)


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
    assert not _leaks(proc.stdout + proc.stderr), _leaks(proc.stdout + proc.stderr)


def test_slow_drip_reference_cannot_stall_a_fetch(servers):
    """A server that sends one byte at a time, each well within the socket timeout, must not hold
    a fetch (and so a worker and the whole job) for hours: the timeout has to bound the fetch."""
    from klein_ray.config import ReferenceConfig, StorageConfig
    from klein_ray.render.references import ReferenceFetcher

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
        except Exception as exc:  # noqa: BLE001
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

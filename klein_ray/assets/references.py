"""Reference images: fetched from s3://, http(s)://, file:// or paths, capped, checked, decoded.

Local and ``s3://`` references are read only from the directories and buckets the job is
confined to (``confinement``), checked before anything is opened. Every source is size-capped
while reading. ``http(s)`` requests connect to an address that was resolved and checked once
(no second lookup a DNS rebinding could change), refuse loopback, private and link-local
addresses unless allow-listed, and re-check every redirect. Decoding asks Pillow for the
accepted formats' plugins only, keeps its decompression-bomb guard, applies EXIF orientation
and converts to RGB.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import os
import random
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from klein_ray.assets.confinement import Refused, check_bucket, local_target
from klein_ray.config import ReferenceConfig, StorageConfig
from klein_ray.storage import TooLarge, open_store
from klein_ray.types import first_line
from klein_ray.uris import HTTP, S3, kind_of, redact, scrub, split_s3

MAX_REDIRECTS = 5
HTTP_ATTEMPTS = 4
# The formats a reference may be in (Pillow's names; docs/configuration.md lists them). Pillow is asked for these
# plugins only: a file in any other format is never parsed by another decoder (EPS would run
# Ghostscript; TIFF, PSD and the rest are attack surface no reference needs).
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP")


class ReferenceError(Exception):
    """A reference that cannot be used; the message is safe to record (no secrets)."""


class _TransientHTTP(OSError):
    """A server answer worth retrying (5xx, 429)."""


@dataclass
class Reference:
    uri: str  # redacted for records
    sha256: str
    bytes: int
    width: int
    height: int
    image: object  # PIL.Image.Image, RGB


class ReferenceFetcher:
    def __init__(self, cfg: ReferenceConfig, storage: StorageConfig):
        self.cfg = cfg
        self.storage = storage

    def fetch(self, uri: str) -> Reference:
        data = self.read(uri)
        image = decode_image(data, redact(uri), self.cfg.max_pixels)
        return Reference(redact(uri), hashlib.sha256(data).hexdigest(), len(data),
                         image.width, image.height, image)

    def read(self, uri: str) -> bytes:
        limit = self.cfg.max_bytes
        try:
            kind = kind_of(uri)
            if kind == S3:
                bucket, key = split_s3(uri)
                check_bucket(uri, self.cfg.s3_buckets)
                return open_store(f"s3://{bucket}", self.storage).get(key, max_bytes=limit)
            if kind == HTTP:
                return self._http_get_retrying(uri)
            return _read_file(local_target(uri, self.cfg.local_roots), uri, limit)
        except TooLarge:
            raise ReferenceError(f"reference {redact(uri)} is larger than {limit} bytes") from None
        except ReferenceError:
            raise
        except Refused as exc:
            raise ReferenceError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - reported per row, without request details
            raise ReferenceError(f"reference {redact(uri)}: {type(exc).__name__}: {scrub(_short(exc))}") from None

    def _http_get_retrying(self, uri: str) -> bytes:
        """Retry what a busy or flaky server does (5xx, 429, resets, timeouts), with backoff,
        all of it within one deadline (``references.total_timeout``, else 4 x timeout)."""
        deadline = time.monotonic() + self.total_seconds
        for attempt in range(1, HTTP_ATTEMPTS + 1):
            try:
                return self._http_get(uri, deadline)
            except (_TransientHTTP, OSError):
                left = deadline - time.monotonic()
                if attempt == HTTP_ATTEMPTS or left <= 0:
                    raise
                time.sleep(min(left, random.uniform(0, 0.5 * 2**attempt)))
        raise AssertionError("unreachable")

    @property
    def total_seconds(self) -> float:
        return self.cfg.total_timeout or 4 * self.cfg.timeout

    def _http_get(self, uri: str, deadline: float) -> bytes:
        # Every step is under the deadline: the connect's own timeout is what is left of it, and
        # a watchdog shuts the socket when it passes, whatever the fetch is waiting for then (a
        # TLS handshake, a status line or headers dripped a byte at a time, the body).
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(uri)
            host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
            ip = self._checked_address(host, port)
            conn = _pinned_connection(parts.scheme, host, ip, port, self.cfg.timeout, deadline)
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, args=(conn,))
            watchdog.daemon = True
            watchdog.start()
            try:
                path = parts.path or "/"
                conn.request("GET", f"{path}?{parts.query}" if parts.query else path,
                             headers={"User-Agent": "klein-ray", "Host": parts.netloc.rsplit("@", 1)[-1]})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308):
                    uri = urljoin(uri, resp.getheader("Location") or "")
                    if urlsplit(uri).scheme not in ("http", "https"):
                        raise ReferenceError(f"reference redirects to a non-http(s) URL ({redact(uri)})")
                    continue
                if resp.status == 429 or resp.status >= 500:
                    raise _TransientHTTP(f"reference {redact(uri)}: HTTP {resp.status}")
                if resp.status != 200:
                    raise ReferenceError(f"reference {redact(uri)}: HTTP {resp.status}")
                data = _read_capped(resp, self.cfg.max_bytes, uri)
                if conn.cut:  # a cut socket can also read as a clean end of the answer
                    raise ReferenceError(self._too_long(uri))
                return data
            except (OSError, http.client.HTTPException) as exc:
                if conn.cut or time.monotonic() >= deadline:  # the watchdog cut it (or was about to)
                    raise ReferenceError(self._too_long(uri)) from None
                if isinstance(exc, http.client.HTTPException):
                    raise ReferenceError(f"reference {redact(uri)}: {type(exc).__name__}") from None
                raise
            finally:
                watchdog.cancel()
                conn.close()
        raise ReferenceError(f"reference {redact(uri)}: more than {MAX_REDIRECTS} redirects")

    def _too_long(self, uri: str) -> str:
        return (f"reference {redact(uri)} took longer than {self.total_seconds:g} s "
                "(references.total_timeout)")

    def _checked_address(self, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise ReferenceError(f"reference host {host!r} does not resolve") from None
        ip = str(infos[0][4][0])
        if not self._allowed(host, ipaddress.ip_address(ip)):
            raise ReferenceError(
                f"reference host {host!r} resolves to a loopback, private or link-local address "
                f"({ip}); add it to references.allow_private_hosts to allow it"
            )
        return ip

    def _allowed(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if ip.is_global and not ip.is_multicast:
            return True
        for entry in self.cfg.allow_private_hosts:
            if entry == host:
                return True
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def decode_image(data: bytes, label: str, max_pixels: int = 64_000_000):
    """Bytes -> RGB PIL image, or ReferenceError saying why not."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=REFERENCE_FORMATS) as img, warnings.catch_warnings():
            # Pillow only raises past twice its own limit; ours is checked before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if img.width * img.height > max_pixels:
                raise ReferenceError(f"reference {label} is {img.width}x{img.height}; at most "
                                     f"{max_pixels} pixels are decoded")
            img.load()  # truncated files fail here
            upright: Image.Image = ImageOps.exif_transpose(img)
            if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
                rgba = upright.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.getchannel("A"))
                return background
            if upright.mode in ("I;16", "I;16B", "I;16L", "I"):
                upright = upright.point(lambda v: v / 256).convert("L")
            return upright.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReferenceError(f"reference {label}: image too large to decode safely") from None
    except UnidentifiedImageError:  # no accepted plugin recognised it; no other was asked
        raise ReferenceError(f"reference {label}: not a readable image in an accepted format "
                             f"({', '.join(REFERENCE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ReferenceError(f"reference {label}: not a readable image ({_short(exc)})") from None


def _read_file(path: Path, uri: str, limit: int) -> bytes:
    """``path``: the resolved file ``local_target`` allowed for the reference ``uri``."""
    # Regular files only: opening a FIFO would wait for a writer, and a device (/dev/zero,
    # /dev/stdin) never ends or blocks. O_NONBLOCK makes the open itself return at once.
    # O_NOFOLLOW: the path was resolved when checked; a link put there since is not followed.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:  # inside the allowed roots (checked first): simply not there
        raise ReferenceError(f"reference {uri} not found ({path} does not exist)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ReferenceError(f"reference {uri} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(uri)
    return data


def _read_capped(resp, limit: int, uri: str) -> bytes:
    declared = resp.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ReferenceError(f"reference {redact(uri)} is larger than {limit} bytes")
    chunks, total = [], 0
    while chunk := resp.read1(1 << 16):
        total += len(chunk)
        if total > limit:
            raise ReferenceError(f"reference {redact(uri)} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _pinned_connection(scheme: str, host: str, ip: str, port: int, timeout: float, deadline: float):
    """A connection to ``ip`` that still speaks to ``host`` (Host header, SNI, certificate). It
    keeps its plain socket as ``raw`` from the moment it exists, so a watchdog can cut a TLS
    handshake too; connecting waits no longer than the deadline allows."""

    def dial(conn) -> socket.socket:
        conn.raw = socket.create_connection((ip, port), max(0.001, min(timeout, deadline - time.monotonic())))
        conn.raw.settimeout(timeout)
        return conn.raw

    class Pinned(http.client.HTTPConnection):
        raw: socket.socket | None = None
        cut = False  # set by the watchdog

        def connect(self):
            self.sock = dial(self)

    class PinnedTLS(http.client.HTTPSConnection):
        raw: socket.socket | None = None
        cut = False  # set by the watchdog

        def connect(self):
            self.sock = self._context.wrap_socket(dial(self), server_hostname=host)  # type: ignore[attr-defined]

    if scheme == "https":
        return PinnedTLS(host, port, timeout=timeout, context=ssl.create_default_context())
    return Pinned(host, port, timeout=timeout)


def _cut(conn) -> None:
    """The watchdog: shut the connection's socket, so whatever read or handshake waits on it
    returns at once with an error."""
    conn.cut = True
    raw = getattr(conn, "raw", None)
    if raw is not None:
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _short(exc: BaseException) -> str:
    return first_line(exc)[:200]

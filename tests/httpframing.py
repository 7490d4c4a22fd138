"""HTTP/1.1 framing for the fault proxy (tests/faultproxy.py), standard library only: requests
and replies read exactly as they came (header lines with their line endings, bodies with their
Content-Length or chunked framing intact, so SigV4 signatures stay valid when relayed), with
limits on line length and header count, and S3-style XML error replies."""

from __future__ import annotations

import socket
import struct
import uuid

MAX_LINE = 64 * 1024
MAX_HEADERS = 200
COPY_CHUNK = 256 * 1024
HOP_BY_HOP = (b"connection:", b"keep-alive:", b"proxy-connection:")

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down"}
_ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "BadGateway": "The fault proxy could not reach the upstream server.",
}


class BadMessage(Exception):
    """Malformed HTTP framing: the connection is dropped."""


def readline(rfile) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise BadMessage("line too long")
    return line


def read_exact(rfile, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = rfile.read(min(n, COPY_CHUNK))
        if not chunk:
            raise BadMessage("connection closed in the middle of a body")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_headers(rfile) -> tuple[list[bytes], dict[str, str]]:
    """Header lines exactly as received (with line endings) and a lower-cased view."""
    raw: list[bytes] = []
    parsed: dict[str, str] = {}
    while True:
        line = readline(rfile)
        if not line:
            raise BadMessage("connection closed inside the header block")
        if line in (b"\r\n", b"\n"):
            return raw, parsed
        if len(raw) >= MAX_HEADERS:
            raise BadMessage("too many headers")
        raw.append(line)
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise BadMessage("malformed header line")
        key = name.strip().lower()
        value = value.strip()
        parsed[key] = f"{parsed[key]}, {value}" if key in parsed else value


def read_chunked_raw(rfile) -> bytes:
    """A chunked body, returned with its framing intact (sizes, extensions, trailers)."""
    parts: list[bytes] = []
    while True:
        size_line = readline(rfile)
        if not size_line:
            raise BadMessage("connection closed inside a chunked body")
        parts.append(size_line)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadMessage("bad chunk size") from None
        if size == 0:
            while True:  # trailer section, ends with an empty line
                line = readline(rfile)
                if not line:
                    raise BadMessage("connection closed inside chunked trailers")
                parts.append(line)
                if line in (b"\r\n", b"\n"):
                    return b"".join(parts)
        parts.append(read_exact(rfile, size))
        crlf = readline(rfile)
        if crlf not in (b"\r\n", b"\n"):
            raise BadMessage("missing CRLF after chunk data")
        parts.append(crlf)


def is_chunked(headers: dict[str, str]) -> bool:
    te = headers.get("transfer-encoding", "")
    return any(t.strip().lower() == "chunked" for t in te.split(","))


def content_length(headers: dict[str, str]) -> int | None:
    if "content-length" not in headers:
        return None
    values = {v.strip() for v in headers["content-length"].split(",")}
    if len(values) != 1:
        raise BadMessage("conflicting Content-Length values")
    try:
        n = int(values.pop())
    except ValueError:
        raise BadMessage("bad Content-Length") from None
    if n < 0:
        raise BadMessage("negative Content-Length")
    return n


def has_token(headers: dict[str, str], name: str, token: str) -> bool:
    return any(t.strip().lower() == token for t in headers.get(name, "").split(","))


def reset(sock: socket.socket) -> None:
    """Abort the connection: SO_LINGER(on, 0) makes close() send a TCP RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class Request:
    __slots__ = ("body", "headers", "line", "method", "raw_headers", "target", "version")

    def __init__(self, line, method, target, version, raw_headers, headers):
        self.line: bytes = line  # the request line, as received
        self.method: str = method
        self.target: str = target
        self.version: str = version
        self.raw_headers: list[bytes] = raw_headers
        self.headers: dict[str, str] = headers
        self.body: bytes = b""

    def wants_close(self) -> bool:
        if has_token(self.headers, "connection", "close"):
            return True
        if self.version == "HTTP/1.0":
            return not has_token(self.headers, "connection", "keep-alive")
        return False

    def upstream_bytes(self) -> bytes:
        kept = [h for h in self.raw_headers if not h.lower().startswith(b"expect:")]
        return b"".join([self.line, *kept, b"\r\n", self.body])


def read_request_head(rfile) -> Request | None:
    line = readline(rfile)
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLFs between requests
        line = readline(rfile)
    if not line:
        return None  # clean close between requests
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadMessage("malformed request line")
    raw_headers, headers = read_headers(rfile)
    return Request(line, parts[0].upper(), parts[1], parts[2], raw_headers, headers)


def read_body(rfile, req: Request) -> None:
    if is_chunked(req.headers):
        req.body = read_chunked_raw(rfile)
    else:
        n = content_length(req.headers)
        req.body = read_exact(rfile, n) if n else b""


def read_reply(ufile, method: str) -> tuple[bytes, list[bytes], bytes]:
    """One upstream reply: its status line, header lines (interim 1xx replies skipped: the
    client had ours) and body; a body delimited by close gets an explicit Content-Length."""
    while True:
        status_line = readline(ufile)
        if not status_line:
            raise BadMessage("upstream closed without a reply")
        fields = status_line.split(b" ", 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
            raise BadMessage("malformed upstream status line")
        try:
            status = int(fields[1])
        except ValueError:
            raise BadMessage("malformed upstream status code") from None
        raw_headers, headers = read_headers(ufile)
        if not 100 <= status < 200:
            break
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif is_chunked(headers):
        body = read_chunked_raw(ufile)
    else:
        n = content_length(headers)
        if n is None:
            body = ufile.read()
            raw_headers.append(f"Content-Length: {len(body)}\r\n".encode())
        else:
            body = read_exact(ufile, n)
    return status_line, raw_headers, body


def error_response(req: Request, status: int, code: str, close: bool) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{_ERROR_MESSAGES[code]}</Message>"
        f"<Resource>{req.target.split('?', 1)[0]}</Resource>"
        f"<RequestId>{request_id}</RequestId></Error>"
    ).encode()
    body_out = b"" if req.method == "HEAD" else body
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"x-amz-request-id: {request_id}\r\n"
        "Server: faultproxy\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n"
        "\r\n"
    ).encode()
    return head + body_out

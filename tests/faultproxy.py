"""A small fault-injecting HTTP reverse proxy for chaos tests (standard library only).

It sits between an S3 client (boto3) and an S3-compatible server on 127.0.0.1 and, per
request, may inject one fault:

``slowdown``      answer ``503 SlowDown`` (S3 XML error), nothing is forwarded;
``internal``      answer ``500 InternalError`` (S3 XML error), nothing is forwarded;
``reset_before``  reset the client connection (SO_LINGER 0 -> TCP RST) right after the
                  request headers arrive, nothing is forwarded;
``reset_after``   forward the whole request upstream (a PUT lands), read the full reply,
                  then reset the client connection instead of replying (the ambiguous case);
``stall``         read the request, forward nothing, say nothing for ``stall_seconds``
                  (longer than the client's read timeout), then close.

Requests are relayed byte-for-byte (request line, header lines including Host, body with
its Content-Length or chunked framing), so SigV4 signatures stay valid. The only header
dropped on the way up is ``Expect`` (never signed by botocore): the proxy itself answers
``100 Continue`` to the client. Each client connection is served by one daemon thread and
may carry many requests (keep-alive); each forwarded request uses a fresh upstream
connection, so a stale upstream keep-alive can never turn into a spurious fault.

``hold(method, path_contains)`` captures the next matching request: it is read whole and kept,
not forwarded, until ``release()``; then it is forwarded (it *lands late*, after whatever
happened meanwhile) and the client connection is reset (its writer is long gone). What a request
stuck in a proxy or a paused writer does.

Usage::

    with FaultProxy("http://127.0.0.1:5000", rate=0.25, seed=1) as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.url, ...)
        ...
        proxy.set_rate(0)        # let a final verification pass cleanly
        print(proxy.stats)       # {"requests": .., "forwarded": .., "slowdown": .., ...}
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import uuid
from typing import Optional, Sequence
from urllib.parse import urlsplit

__all__ = ["ALL_FAULTS", "FaultProxy"]

ALL_FAULTS: tuple[str, ...] = ("slowdown", "internal", "reset_before", "reset_after", "stall")

_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200
_CLIENT_IDLE_TIMEOUT = 120.0
_UPSTREAM_TIMEOUT = 60.0
_COPY_CHUNK = 256 * 1024
_HOP_BY_HOP = (b"connection:", b"keep-alive:", b"proxy-connection:")

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down"}
_ERROR_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "BadGateway": "The fault proxy could not reach the upstream server.",
}


class _BadMessage(Exception):
    """Malformed HTTP framing: the connection is dropped."""


def _readline(rfile) -> bytes:
    line = rfile.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise _BadMessage("line too long")
    return line


def _read_exact(rfile, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = rfile.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise _BadMessage("connection closed in the middle of a body")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_headers(rfile) -> tuple[list[bytes], dict[str, str]]:
    """Header lines exactly as received (with line endings) and a lower-cased view."""
    raw: list[bytes] = []
    parsed: dict[str, str] = {}
    while True:
        line = _readline(rfile)
        if not line:
            raise _BadMessage("connection closed inside the header block")
        if line in (b"\r\n", b"\n"):
            return raw, parsed
        if len(raw) >= _MAX_HEADERS:
            raise _BadMessage("too many headers")
        raw.append(line)
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise _BadMessage("malformed header line")
        key = name.strip().lower()
        value = value.strip()
        parsed[key] = f"{parsed[key]}, {value}" if key in parsed else value


def _read_chunked_raw(rfile) -> bytes:
    """A chunked body, returned with its framing intact (sizes, extensions, trailers)."""
    parts: list[bytes] = []
    while True:
        size_line = _readline(rfile)
        if not size_line:
            raise _BadMessage("connection closed inside a chunked body")
        parts.append(size_line)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadMessage("bad chunk size") from None
        if size == 0:
            while True:  # trailer section, ends with an empty line
                line = _readline(rfile)
                if not line:
                    raise _BadMessage("connection closed inside chunked trailers")
                parts.append(line)
                if line in (b"\r\n", b"\n"):
                    return b"".join(parts)
        parts.append(_read_exact(rfile, size))
        crlf = _readline(rfile)
        if crlf not in (b"\r\n", b"\n"):
            raise _BadMessage("missing CRLF after chunk data")
        parts.append(crlf)


def _is_chunked(headers: dict[str, str]) -> bool:
    te = headers.get("transfer-encoding", "")
    return any(t.strip().lower() == "chunked" for t in te.split(","))


def _content_length(headers: dict[str, str]) -> Optional[int]:
    if "content-length" not in headers:
        return None
    values = {v.strip() for v in headers["content-length"].split(",")}
    if len(values) != 1:
        raise _BadMessage("conflicting Content-Length values")
    try:
        n = int(values.pop())
    except ValueError:
        raise _BadMessage("bad Content-Length") from None
    if n < 0:
        raise _BadMessage("negative Content-Length")
    return n


def _has_token(headers: dict[str, str], name: str, token: str) -> bool:
    return any(t.strip().lower() == token for t in headers.get(name, "").split(","))


def _reset(sock: socket.socket) -> None:
    """Abort the connection: SO_LINGER(on, 0) makes close() send a TCP RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Request:
    __slots__ = ("line", "method", "target", "version", "raw_headers", "headers", "body")

    def __init__(self, line, method, target, version, raw_headers, headers):
        self.line: bytes = line  # the request line, as received
        self.method: str = method
        self.target: str = target
        self.version: str = version
        self.raw_headers: list[bytes] = raw_headers
        self.headers: dict[str, str] = headers
        self.body: bytes = b""

    def wants_close(self) -> bool:
        if _has_token(self.headers, "connection", "close"):
            return True
        if self.version == "HTTP/1.0":
            return not _has_token(self.headers, "connection", "keep-alive")
        return False

    def upstream_bytes(self) -> bytes:
        kept = [h for h in self.raw_headers if not h.lower().startswith(b"expect:")]
        return b"".join([self.line, *kept, b"\r\n", self.body])


class Hold:
    """One captured request: ``arrived`` once it is held, ``landed`` once released and applied."""

    def __init__(self, method: str, path_contains: str, header: Optional[str] = None) -> None:
        self.method, self.path_contains = method.upper(), path_contains
        self.header = header.lower() if header else None
        self.arrived = threading.Event()
        self.landed = threading.Event()
        self.status: Optional[int] = None  # the upstream's answer to the late request
        self._go = threading.Event()

    def matches(self, req: "_Request") -> bool:
        return (req.method == self.method and self.path_contains in req.target
                and (self.header is None or self.header in req.headers))

    def release(self) -> None:
        self._go.set()


class FaultProxy:
    """Fault-injecting reverse proxy; see the module docstring."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.25,
        faults: Sequence[str] = ALL_FAULTS,
        seed: int = 0,
        stall_seconds: float = 3.0,
        methods: Sequence[str] | None = None,
    ) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must look like http://HOST:PORT, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        faults = tuple(faults)
        unknown = sorted(set(faults) - set(ALL_FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {ALL_FAULTS}")
        self.faults = faults
        self.stall_seconds = float(stall_seconds)
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self._rate = 0.0
        self.set_rate(rate)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stats = {"requests": 0, "forwarded": 0, "upstream_errors": 0, "connections": 0}
        self._stats.update({f: 0 for f in ALL_FAULTS})
        #: (method, target, outcome) per request, outcome being a fault name or "forwarded".
        self.history: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.port: Optional[int] = None
        self._holds: list[Hold] = []

    # ----------------------------------------------------------------- public API
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot: requests, forwarded, upstream_errors, connections (accepted) and one
        count per fault kind."""
        with self._lock:
            return dict(self._stats)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        if rate > 0 and not self.faults:
            raise ValueError("rate > 0 needs at least one fault kind")
        self._rate = rate

    def hold(self, method: str, path_contains: str, header: Optional[str] = None) -> Hold:
        """Capture the next ``method`` request whose path contains ``path_contains`` (and that
        carries ``header``, e.g. ``If-Match``)."""
        hold = Hold(method, path_contains, header)
        with self._lock:
            self._holds.append(hold)
        return hold

    def _take_hold(self, req: "_Request") -> Optional[Hold]:
        with self._lock:
            for hold in self._holds:
                if hold.matches(req):
                    self._holds.remove(hold)
                    return hold
        return None

    def _land_late(self, req: "_Request", hold: Hold) -> None:
        hold.arrived.set()
        while not hold._go.wait(0.1):
            if self._stop.is_set():
                return
        try:
            response = self._forward(req)
            hold.status = int(response.split(b" ", 2)[1])
        finally:
            self._record(req, "held")
            hold.landed.set()

    def start(self) -> "FaultProxy":
        if self._listener is not None:
            raise RuntimeError("FaultProxy already started")
        self._stop.clear()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.1)  # accept loop polls the stop flag
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every client connection; join the threads."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
            self._listener = None
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:  # wakes handler threads blocked in recv
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FaultProxy":
        return self.start() if self._listener is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------- internals
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.01)
                continue
            conn.settimeout(_CLIENT_IDLE_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name=f"faultproxy-conn-{self.port}")
            with self._lock:
                self._stats["connections"] += 1
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _choose_fault(self, method: str) -> Optional[str]:
        with self._lock:
            self._stats["requests"] += 1
            if self._rate <= 0.0 or (self.methods is not None and method not in self.methods):
                return None
            if self._rng.random() >= self._rate:
                return None
            fault = self._rng.choice(self.faults)
            self._stats[fault] += 1
            return fault

    def _record(self, req: _Request, outcome: str) -> None:
        with self._lock:
            if outcome in ("forwarded", "reset_after"):
                self._stats["forwarded"] += 1
            if outcome == "upstream_error":
                self._stats["upstream_errors"] += 1
            self.history.append((req.method, req.target, outcome))

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        reset = False
        try:
            while not self._stop.is_set():
                req = self._read_request_head(rfile)
                if req is None:
                    return
                fault = self._choose_fault(req.method)
                if fault == "reset_before":
                    self._record(req, fault)
                    reset = True
                    return
                if _has_token(req.headers, "expect", "100-continue"):
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                self._read_body(rfile, req)
                held = self._take_hold(req)
                if held is not None:
                    self._land_late(req, held)
                    reset = True  # the writer gave up long ago: no one reads the reply
                    return
                if fault == "stall":
                    self._record(req, fault)
                    self._stop.wait(self.stall_seconds)
                    return  # plain close (FIN) after the stall
                if fault in ("slowdown", "internal"):
                    self._record(req, fault)
                    status, code = (503, "SlowDown") if fault == "slowdown" else (500, "InternalError")
                    conn.sendall(self._error_response(req, status, code, close=req.wants_close()))
                    if req.wants_close():
                        return
                    continue
                try:
                    response = self._forward(req)
                except (OSError, _BadMessage):
                    self._record(req, "upstream_error")
                    conn.sendall(self._error_response(req, 502, "BadGateway", close=True))
                    return
                if fault == "reset_after":
                    self._record(req, fault)
                    reset = True
                    return
                self._record(req, "forwarded")
                conn.sendall(response)
                if req.wants_close():
                    return
        except (OSError, _BadMessage):
            return  # client went away or sent garbage: drop the connection
        finally:
            try:
                rfile.close()  # release the makefile reference so close() really closes
            except OSError:
                pass
            if reset:
                _reset(conn)
            else:
                try:
                    conn.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _read_request_head(self, rfile) -> Optional[_Request]:
        line = _readline(rfile)
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLFs between requests
            line = _readline(rfile)
        if not line:
            return None  # clean close between requests
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _BadMessage("malformed request line")
        raw_headers, headers = _read_headers(rfile)
        return _Request(line, parts[0].upper(), parts[1], parts[2], raw_headers, headers)

    @staticmethod
    def _read_body(rfile, req: _Request) -> None:
        if _is_chunked(req.headers):
            req.body = _read_chunked_raw(rfile)
        else:
            n = _content_length(req.headers)
            req.body = _read_exact(rfile, n) if n else b""

    def _forward(self, req: _Request) -> bytes:
        """Relay one request on a fresh upstream connection and return the raw reply."""
        payload = req.upstream_bytes()
        with socket.create_connection(self.upstream, timeout=_UPSTREAM_TIMEOUT) as up:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.sendall(payload)
            with up.makefile("rb") as ufile:
                while True:
                    status_line = _readline(ufile)
                    if not status_line:
                        raise _BadMessage("upstream closed without a reply")
                    fields = status_line.split(b" ", 2)
                    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
                        raise _BadMessage("malformed upstream status line")
                    try:
                        status = int(fields[1])
                    except ValueError:
                        raise _BadMessage("malformed upstream status code") from None
                    raw_headers, headers = _read_headers(ufile)
                    if 100 <= status < 200:
                        continue  # interim reply (e.g. 100 Continue): we already sent ours
                    break
                if req.method == "HEAD" or status in (204, 304):
                    body = b""
                elif _is_chunked(headers):
                    body = _read_chunked_raw(ufile)
                else:
                    n = _content_length(headers)
                    if n is None:  # delimited by close: pass it on with an explicit length
                        body = ufile.read()
                        raw_headers.append(f"Content-Length: {len(body)}\r\n".encode())
                    else:
                        body = _read_exact(ufile, n)
        # Connection/Keep-Alive are hop-by-hop: the upstream leg is one request long anyway
        # (moto's werkzeug always says "Connection: close"), the client leg stays open.
        raw_headers = [h for h in raw_headers if not h.lower().startswith(_HOP_BY_HOP)]
        raw_headers.append(b"Connection: close\r\n" if req.wants_close() else
                           b"Connection: keep-alive\r\n")
        return b"".join([status_line, *raw_headers, b"\r\n", body])

    @staticmethod
    def _error_response(req: _Request, status: int, code: str, close: bool) -> bytes:
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

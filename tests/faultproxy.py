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
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from httpframing import (
    HOP_BY_HOP,
    BadMessage,
    Request,
    error_response,
    has_token,
    read_body,
    read_reply,
    read_request_head,
    reset,
)

__all__ = ["ALL_FAULTS", "FaultProxy"]

ALL_FAULTS: tuple[str, ...] = ("slowdown", "internal", "reset_before", "reset_after", "stall")

_CLIENT_IDLE_TIMEOUT = 120.0
_UPSTREAM_TIMEOUT = 60.0


class Hold:
    """One captured request: ``arrived`` once it is held, ``landed`` once released and applied."""

    def __init__(self, method: str, path_contains: str, header: str | None = None) -> None:
        self.method, self.path_contains = method.upper(), path_contains
        self.header = header.lower() if header else None
        self.arrived = threading.Event()
        self.landed = threading.Event()
        self.status: int | None = None  # the upstream's answer to the late request
        self._go = threading.Event()

    def matches(self, req: Request) -> bool:
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
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.port: int | None = None
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

    def hold(self, method: str, path_contains: str, header: str | None = None) -> Hold:
        """Capture the next ``method`` request whose path contains ``path_contains`` (and that
        carries ``header``, e.g. ``If-Match``)."""
        hold = Hold(method, path_contains, header)
        with self._lock:
            self._holds.append(hold)
        return hold

    def _take_hold(self, req: Request) -> Hold | None:
        with self._lock:
            for hold in self._holds:
                if hold.matches(req):
                    self._holds.remove(hold)
                    return hold
        return None

    def _land_late(self, req: Request, hold: Hold) -> None:
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

    def start(self) -> FaultProxy:
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

    def __enter__(self) -> FaultProxy:
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
            except TimeoutError:
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

    def _choose_fault(self, method: str) -> str | None:
        with self._lock:
            self._stats["requests"] += 1
            if self._rate <= 0.0 or (self.methods is not None and method not in self.methods):
                return None
            if self._rng.random() >= self._rate:
                return None
            fault = self._rng.choice(self.faults)
            self._stats[fault] += 1
            return fault

    def _record(self, req: Request, outcome: str) -> None:
        with self._lock:
            if outcome in ("forwarded", "reset_after"):
                self._stats["forwarded"] += 1
            if outcome == "upstream_error":
                self._stats["upstream_errors"] += 1
            self.history.append((req.method, req.target, outcome))


    def _serve(self, conn: socket.socket) -> None:
        """One client connection: its requests in turn until it closes, a fault ends it, or the
        proxy stops; then closed, or reset where a fault (or a late landing) calls for it."""
        rfile = conn.makefile("rb")
        ending = "close"
        try:
            while not self._stop.is_set():
                req = read_request_head(rfile)
                if req is None:
                    return
                ending = self._answer(conn, rfile, req)
                if ending != "next":
                    return
        except (OSError, BadMessage):
            return  # client went away or sent garbage: drop the connection
        finally:
            try:
                rfile.close()  # release the makefile reference so close() really closes
            except OSError:
                pass
            if ending == "reset":
                reset(conn)
            else:
                try:
                    conn.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _answer(self, conn: socket.socket, rfile, req: Request) -> str:
        """Serve one request, with its fault if one is drawn. Returns how the connection goes
        on: "next" (keep-alive), "close" or "reset"."""
        fault = self._choose_fault(req.method)
        if fault == "reset_before":
            self._record(req, fault)
            return "reset"
        if has_token(req.headers, "expect", "100-continue"):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        read_body(rfile, req)
        held = self._take_hold(req)
        if held is not None:
            self._land_late(req, held)
            return "reset"  # the writer gave up long ago: no one reads the reply
        if fault == "stall":
            self._record(req, fault)
            self._stop.wait(self.stall_seconds)
            return "close"  # plain close (FIN) after the stall
        if fault in ("slowdown", "internal"):
            self._record(req, fault)
            status, code = (503, "SlowDown") if fault == "slowdown" else (500, "InternalError")
            conn.sendall(error_response(req, status, code, close=req.wants_close()))
            return "close" if req.wants_close() else "next"
        try:
            response = self._forward(req)
        except (OSError, BadMessage):
            self._record(req, "upstream_error")
            conn.sendall(error_response(req, 502, "BadGateway", close=True))
            return "close"
        if fault == "reset_after":
            self._record(req, fault)
            return "reset"
        self._record(req, "forwarded")
        conn.sendall(response)
        return "close" if req.wants_close() else "next"

    def _forward(self, req: Request) -> bytes:
        """Relay one request on a fresh upstream connection and return the raw reply."""
        payload = req.upstream_bytes()
        with socket.create_connection(self.upstream, timeout=_UPSTREAM_TIMEOUT) as up:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.sendall(payload)
            with up.makefile("rb") as ufile:
                status_line, raw_headers, body = read_reply(ufile, req.method)
        # Connection/Keep-Alive are hop-by-hop: the upstream leg is one request long anyway
        # (moto's werkzeug always says "Connection: close"), the client leg stays open.
        raw_headers = [h for h in raw_headers if not h.lower().startswith(HOP_BY_HOP)]
        raw_headers.append(b"Connection: close\r\n" if req.wants_close() else
                           b"Connection: keep-alive\r\n")
        return b"".join([status_line, *raw_headers, b"\r\n", body])

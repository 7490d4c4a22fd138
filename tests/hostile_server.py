"""Recording HTTP servers for the hostile tests: every request and connection is logged, so a
test can prove that no request reached a refused address; routes for images, redirects and
oversized bodies (declared, or streamed without a length)."""

from __future__ import annotations

import http.server
import os
import socket
import threading

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


def send_bytes(data: bytes, content_type="image/png"):
    def route(h, _rec):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return route


def redirect(location: str):
    def route(h, _rec):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def declared_big(h, _rec):
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


def stream_big(h, rec):
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

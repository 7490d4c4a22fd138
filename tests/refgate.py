"""A gate for forcing interleavings in end-to-end tests, without sleeps: rows whose references are
served by a test HTTP server that holds them back until the test (or a condition on what is
waiting) lets them through. A run can then be stopped, or a node killed or added, while units
provably wait in flight. The job's config needs ``references=REFERENCES``."""

from __future__ import annotations

import http.server
import io
import threading

from PIL import Image

# The job's `references` settings for gated rows: the gate is on loopback, and holds fetches long.
REFERENCES = {"allow_private_hosts": ["127.0.0.1"], "timeout": 300}


class RefGate:
    """References served over http that stop answering once ``free`` have gone out, until more
    rows wait on them at once than one actor can hold (``held``: its units in flight, a unit
    being one row when each row has a reference of its own, since rows are grouped into units
    by their references). Then every actor holds work (``full``), and the gate opens unless
    the test opens it itself (``auto_open=False``): the interleaving is forced, not timed."""

    def __init__(self, free: int, held: int, auto_open: bool = True):
        self.image, self.free, self.held, self.auto_open = _png_bytes(), free, held, auto_open
        self.lock, self.open, self.full = threading.Lock(), threading.Event(), threading.Event()
        self.served, self.waiting = 0, set()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                gate.wait_turn(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(gate.image)))
                self.end_headers()
                self.wfile.write(gate.image)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a killed node's requests answered into closed sockets

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gated(self, rows: list[dict], per: int = 1) -> list[dict]:
        """``rows``, each with a reference behind this gate, one per ``per`` consecutive rows
        (``per`` > 1: units still batch rows)."""
        return [dict(r, references=[f"{self.url}/ref/{i // per}.png"]) for i, r in enumerate(rows)]

    def wait_turn(self, path: str) -> None:
        with self.lock:
            self.served += 1
            if self.served <= self.free or self.open.is_set():
                return
            self.waiting.add(path)
            if len(self.waiting) > self.held:
                self.full.set()
                if self.auto_open:
                    self.open.set()
        self.open.wait(timeout=300)

    def close(self) -> None:
        self.open.set()
        self.server.shutdown()
        self.server.server_close()


def _png_bytes() -> bytes:
    """A small valid reference image."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()

"""Every step of an http(s) reference fetch is under one deadline (``references.total_timeout``),
and no URL's secret reaches a record: a server that drips its status line or its headers a byte
at a time, or accepts and says nothing, costs at most the deadline and fails the row at stage
``fetch`` (before: only the body was timed, so such a row held a worker until
``run.unit_timeout_s``, 30 minutes, four times over); a reference that redirects to a signed URL
whose path has a space fails without its query string in the message, the errors table, the
report or the log (before: only the original URI was scrubbed)."""

from __future__ import annotations

import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
from localrun import job, manifest, render

from klein_ray.assets.references import ReferenceError, ReferenceFetcher
from klein_ray.config import ReferenceConfig, StorageConfig
from klein_ray.types import RowError, RowSpec
from klein_ray.uris import scrub

SECRET = "Xamz5ecretSignatureValue"


class Dripper:
    """A raw TCP server: per connection, ``script`` (bytes) sent one byte every ``every`` s."""

    def __init__(self, script: bytes, every: float = 0.05):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.script, self.every = script, every
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in self.script:
                    if self.stop.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
                self.stop.wait()
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _fetcher(total: float = 1.0) -> ReferenceFetcher:
    cfg = ReferenceConfig(timeout=0.5, total_timeout=total, allow_private_hosts=["127.0.0.1"])
    return ReferenceFetcher(cfg, StorageConfig())


LONG_HEADERS = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 40) for i in range(200))


@pytest.mark.parametrize("script", [
    b"HTTP/1.1 200 OK\r\n",  # the status line, dripped
    LONG_HEADERS,  # headers, dripped: each byte inside the per-read timeout
    b"",  # accepts, reads the request, says nothing at all
], ids=["status-line", "headers", "silent"])
def test_a_dripping_server_costs_at_most_the_deadline(script):
    server = Dripper(script)
    try:
        started = time.monotonic()
        with pytest.raises(ReferenceError, match=r"took longer than 1 s \(references.total_timeout\)"):
            _fetcher(total=1.0).fetch(f"http://127.0.0.1:{server.port}/ref.png")
        assert time.monotonic() - started < 3.0
    finally:
        server.close()


def test_the_deadline_spans_retries_of_a_failing_server():
    """A server that resets every connection is retried with backoff, within the same deadline."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def reset() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    threading.Thread(target=reset, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ReferenceError):
            _fetcher(total=1.0).fetch(f"http://127.0.0.1:{sock.getsockname()[1]}/ref.png")
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        sock.close()


def _redirector(location: bytes) -> Dripper:
    reply = b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
    return Dripper(reply, every=0.0)


def test_a_redirect_to_a_signed_url_keeps_its_secret_out_of_the_error():
    server = _redirector(b"/images/a b.png?X-Amz-Signature=" + SECRET.encode() + b"&token=" + SECRET.encode())
    try:
        with pytest.raises(ReferenceError) as raised:
            _fetcher().fetch(f"http://127.0.0.1:{server.port}/ref.png")
    finally:
        server.close()
    row = RowSpec("r", "p", "tiny", (), 64, 64, 4, 1.0, 1, "derived", "png")
    recorded = RowError.from_exception(row, "fetch", raised.value)
    assert SECRET not in str(raised.value) and SECRET not in recorded.message


def test_a_signed_redirect_reaches_no_record_of_a_run(tmp_path, tiny_models, caplog):
    server = _redirector(b"/images/a b.png?X-Amz-Signature=" + SECRET.encode())
    try:
        cfg = job(tiny_models).model_copy(update={"references": ReferenceConfig(
            timeout=2.0, total_timeout=5.0, allow_private_hosts=["127.0.0.1"])})
        uri = manifest(tmp_path / "m.parquet", [{"id": "signed", "prompt": "a mug", "width": 64, "height": 64,
                                                 "references": [f"http://127.0.0.1:{server.port}/ref.png"]}])
        out = tmp_path / "out"
        summary, code = render(uri, str(out), cfg)
    finally:
        server.close()
    assert code == 1 and summary["failed"] == 1
    errors = pq.ParquetFile(out / "_job" / "errors.parquet").read().to_pylist()
    assert errors[0]["stage"] == "fetch"
    for path in (out / "_job").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text


@pytest.mark.parametrize("text", [
    f"InvalidURL: URL can't contain control characters. '/a b?sig={SECRET}' (found at least ' ')",
    f"reference https://user:{SECRET}@host/x failed",
    f"redirected to https://h/p?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}",
    f"token={SECRET} in a message",
])
def test_the_scrubber_leaves_no_secret(text):
    assert SECRET not in scrub(text)

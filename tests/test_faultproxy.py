"""Tests for tests/faultproxy.py: a fault-injecting reverse proxy in front of moto."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ReadTimeoutError

try:
    from faultproxy import ALL_FAULTS, FaultProxy
except ImportError:  # tests/ turned into a package
    from tests.faultproxy import ALL_FAULTS, FaultProxy

pytestmark = pytest.mark.timeout(120)

STALL = 1.5  # > read_timeout below, so a stall is a client-side read timeout


def _config(total_max_attempts: int = 10) -> Config:
    return Config(
        retries={"mode": "standard", "total_max_attempts": total_max_attempts},
        connect_timeout=1,
        read_timeout=1,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )


def _client(url: str, total_max_attempts: int = 10):
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=_config(total_max_attempts),
    )


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def direct(moto_url):
    return _client(moto_url)


@pytest.fixture
def bucket(direct):
    name = f"chaos-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=name)
    return name


def _exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False


def _raw_put(url: str, bucket: str, key: str, body: bytes, timeout: float = 5.0):
    """One unsigned PUT on a raw socket (moto does not check signatures)."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(
        f"PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    return sock


# --------------------------------------------------------------------------- rate 0


def test_rate_zero_passes_put_get_list_through(moto_url, direct, bucket):
    bodies = {f"obj/{i:03d}": hashlib.sha256(str(i).encode()).digest() * (1 + i * 97) for i in range(50)}
    with FaultProxy(moto_url, rate=0.0) as proxy:
        s3 = _client(proxy.url)
        for key, body in bodies.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"n": key})
        for key, body in bodies.items():
            got = s3.get_object(Bucket=bucket, Key=key)
            assert got["Body"].read() == body
            assert got["Metadata"] == {"n": key}
        listed = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, PaginationConfig={"PageSize": 20})
            for o in page.get("Contents", [])
        ]
        stats = proxy.stats
    assert listed == sorted(bodies)
    for key, body in bodies.items():  # and straight from moto
        assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    assert stats["requests"] == stats["forwarded"] == 100 + 3
    assert all(stats[f] == 0 for f in ALL_FAULTS)
    assert stats["connections"] <= 2, "boto3's pooled keep-alive connection should be reused"


class _CaptureServer:
    """An upstream that records the raw bytes of one request and answers 200."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.raw = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head = data.split(b"\r\n\r\n", 1)[0].lower()
            if b"transfer-encoding: chunked" in head:
                while not data.endswith(b"\r\n0\r\n\r\n"):
                    data += conn.recv(65536)
            else:
                length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                while len(data) < len(head) + 4 + length:
                    data += conn.recv(65536)
            self.raw = data
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        self.sock.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_bytes_are_relayed_verbatim(framing):
    upstream = _CaptureServer()
    body = bytes(range(256)) * 300
    head = (
        "PUT /bkt/key?x-id=PutObject HTTP/1.1\r\n"
        "Host: s3.example.test:9000\r\n"
        "X-Amz-Date: 20250101T000000Z\r\n"
        "Authorization: AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=abc\r\n"
    )
    if framing == "chunked":
        sent_body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:1000], body[1000:]))
        sent_body += b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\nContent-Encoding: aws-chunked\r\n"
    else:
        sent_body = body
        head += f"Content-Length: {len(body)}\r\n"
    with FaultProxy(upstream.url, rate=0.0) as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with sock:
            sock.sendall((head + "Expect: 100-continue\r\n\r\n").encode())
            assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(sent_body)
            reply = b""
            while not reply.endswith(b"ok"):
                reply += sock.recv(4096)
    upstream.thread.join(5)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: keep-alive" in reply  # the client leg stays open
    # Everything but the (unsigned) Expect header reaches upstream byte-for-byte.
    assert upstream.raw == (head + "\r\n").encode() + sent_body


# ------------------------------------------------------------------- one fault at a time


@pytest.mark.parametrize("fault,status,code", [("slowdown", 503, "SlowDown"),
                                               ("internal", 500, "InternalError")])
def test_error_faults_answer_s3_xml_without_forwarding(moto_url, direct, bucket, fault, status, code):
    with FaultProxy(moto_url, rate=1.0, faults=[fault]) as proxy:
        s3 = _client(proxy.url, total_max_attempts=1)
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=bucket, Key="k", Body=b"data")
        assert info.value.response["Error"]["Code"] == code
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
        assert not _exists(direct, bucket, "k")
        proxy.set_rate(0)  # the same keep-alive connection carries on
        s3.put_object(Bucket=bucket, Key="k", Body=b"data")
        stats = proxy.stats
    assert stats[fault] == 1 and stats["forwarded"] == 1 and stats["connections"] == 1
    assert direct.get_object(Bucket=bucket, Key="k")["Body"].read() == b"data"


def test_reset_before_forwarding(moto_url, direct, bucket):
    with FaultProxy(moto_url, rate=1.0, faults=["reset_before"]) as proxy:
        s3 = _client(proxy.url, total_max_attempts=1)
        with pytest.raises(ConnectionClosedError):
            s3.put_object(Bucket=bucket, Key="k", Body=b"data")
        sock = _raw_put(proxy.url, bucket, "raw", b"data")
        with sock, pytest.raises(ConnectionResetError):  # an RST, not a FIN
            sock.recv(1024)
        stats = proxy.stats
    assert stats["reset_before"] == 2 and stats["forwarded"] == 0
    assert not _exists(direct, bucket, "k") and not _exists(direct, bucket, "raw")


def test_reset_after_forwarding_lands_the_put(moto_url, direct, bucket):
    with FaultProxy(moto_url, rate=1.0, faults=["reset_after"]) as proxy:
        s3 = _client(proxy.url, total_max_attempts=1)
        with pytest.raises(ConnectionClosedError):
            s3.put_object(Bucket=bucket, Key="k", Body=b"landed")
        sock = _raw_put(proxy.url, bucket, "raw", b"raw landed")
        with sock, pytest.raises(ConnectionResetError):
            sock.recv(1024)
        stats = proxy.stats
    assert stats["reset_after"] == 2 and stats["forwarded"] == 2
    # The client saw only a broken connection, yet both PUTs are in the bucket.
    assert direct.get_object(Bucket=bucket, Key="k")["Body"].read() == b"landed"
    assert direct.get_object(Bucket=bucket, Key="raw")["Body"].read() == b"raw landed"


@pytest.mark.slow  # waits out client timeouts
def test_stall_times_the_client_out_then_closes(moto_url, direct, bucket):
    with FaultProxy(moto_url, rate=1.0, faults=["stall"], stall_seconds=STALL) as proxy:
        s3 = _client(proxy.url, total_max_attempts=1)
        t0 = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            s3.put_object(Bucket=bucket, Key="k", Body=b"data")
        assert 0.9 <= time.monotonic() - t0 < STALL
        sock = _raw_put(proxy.url, bucket, "raw", b"data")
        t0 = time.monotonic()
        with sock:
            assert sock.recv(1024) == b""  # silence, then a plain close
        assert STALL - 0.1 <= time.monotonic() - t0 < STALL + 1.0
        stats = proxy.stats
    assert stats["stall"] == 2 and stats["forwarded"] == 0
    assert not _exists(direct, bucket, "k") and not _exists(direct, bucket, "raw")


def test_methods_restricts_injection(moto_url, direct, bucket):
    direct.put_object(Bucket=bucket, Key="k", Body=b"v1")
    with FaultProxy(moto_url, rate=1.0, faults=["internal"], methods=["put"]) as proxy:
        s3 = _client(proxy.url, total_max_attempts=1)
        assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v1"
        s3.head_object(Bucket=bucket, Key="k")
        with pytest.raises(ClientError):
            s3.put_object(Bucket=bucket, Key="k", Body=b"v2")
    assert proxy.stats["internal"] == 1 and proxy.stats["forwarded"] == 2


def test_stop_closes_listener_and_threads(moto_url, bucket):
    before = set(threading.enumerate())
    proxy = FaultProxy(moto_url, rate=1.0, faults=["stall"], stall_seconds=30).start()
    port = proxy.port
    idle = socket.create_connection(("127.0.0.1", port))  # an idle keep-alive connection
    stalled = _raw_put(proxy.url, bucket, "k", b"x")  # a request stalled for 30 s
    deadline = time.monotonic() + 5
    while proxy.stats["stall"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 2
    leftover = [t for t in set(threading.enumerate()) - before if t.name.startswith("faultproxy")]
    assert leftover == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    idle.close()
    stalled.close()


def test_rejects_bad_arguments(moto_url):
    with pytest.raises(ValueError):
        FaultProxy(moto_url, faults=["nope"])
    with pytest.raises(ValueError):
        FaultProxy(moto_url, rate=1.5)
    with pytest.raises(ValueError):
        FaultProxy(moto_url, rate=0.5, faults=[])
    with pytest.raises(ValueError):
        FaultProxy("ftp://127.0.0.1:1")


# ------------------------------------------------------------------------- all together


def _conditional_create(s3, bucket: str, key: str, body: bytes) -> str:
    """Create-once with IfNoneMatch='*'; decide an ambiguous 412 by a sha256 in Metadata."""
    digest = hashlib.sha256(body).hexdigest()
    for _ in range(30):
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*",
                          Metadata={"sha256": digest})
            return "created"
        except ClientError as e:
            status = e.response["ResponseMetadata"]["HTTPStatusCode"]
            if status == 412 or e.response["Error"]["Code"] == "PreconditionFailed":
                try:
                    meta = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
                except (ClientError, BotoCoreError):
                    continue  # the HEAD failed too: start over, the PUT will 412 again
                return "mine" if meta.get("sha256") == digest else "conflict"
            # 409 ConditionalRequestConflict, or 5xx after botocore gave up: try again
        except BotoCoreError:
            pass  # connection errors / timeouts after botocore gave up
        time.sleep(0.05)
    raise AssertionError(f"{key}: no decision after 30 attempts")


@pytest.mark.slow  # 100 commits through 27% injected faults, retries and backoff included
def test_conditional_creates_land_exactly_once_through_all_faults(moto_url, direct, bucket):
    objects = {f"shard-{i:03d}": f"payload {i} ".encode() * (50 + i) for i in range(60)}
    direct.put_object(Bucket=bucket, Key="taken", Body=b"someone else",
                      Metadata={"sha256": hashlib.sha256(b"someone else").hexdigest()})
    outcomes: dict[str, str] = {}
    with FaultProxy(moto_url, rate=0.25, seed=7, stall_seconds=STALL) as proxy:
        s3 = _client(proxy.url)
        for key, body in objects.items():
            outcomes[key] = _conditional_create(s3, bucket, key, body)
        taken = _conditional_create(s3, bucket, "taken", b"my own bytes")
        stats = proxy.stats
        proxy.set_rate(0)
        listed = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                  for o in page.get("Contents", [])]
        for key, body in objects.items():
            assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    assert taken == "conflict"
    assert direct.get_object(Bucket=bucket, Key="taken")["Body"].read() == b"someone else"
    assert sorted(listed) == sorted([*objects, "taken"])
    assert set(outcomes.values()) <= {"created", "mine"}
    assert "mine" in outcomes.values(), "a reset_after PUT should have come back as our own 412"
    for fault in ALL_FAULTS:
        assert stats[fault] >= 1, (fault, stats)
    faults = sum(stats[f] for f in ALL_FAULTS)
    assert 0.15 < faults / stats["requests"] < 0.35, stats

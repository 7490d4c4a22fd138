"""Shared test fixtures: the tiny real models, one local Ray per session, and real S3 servers;
and the test tiers.

Tiers by resource, as pytest markers (``--strict-markers``): ``ray``, ``ceph``, ``browser``,
``subprocess`` (starts a process: the CLI, Ray, a compiler) and ``slow``. A test that uses the
``ray_address``, ``rgw`` or ``chromium`` fixture is marked for it here; the others are marked
where they are written. ``make test-fast`` runs the tests with none of these marks, with
``KLEIN_RAY_TEST_TIER=fast``: then importing ray, starting a process, or asking for Ceph or a
browser fails the test at once, so an unmarked test cannot lean on them unnoticed.

- ``rgw``: Ceph's RADOS Gateway from Debian packages (a real S3 implementation), started once
  per session by ``infra/ceph-rgw-up.sh``.
- ``moto_s3``: moto's threaded server, for fast storage unit tests.
- ``ray_address``: one local Ray started in this process; CLI subprocesses join it with
  ``--address``, so no test pays Ray's start-up twice.
- ``hostile``, ``allowed``, ``servers`` (from ``hostile_fixtures``): the hostile-input renders.
- ``export_source`` (from ``exportcheck``): one rendered output the export tests read.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (browser, faultproxy)
# Session fixtures shared by several modules (a fixture imported into two modules would run twice).
pytest_plugins = ["hostile_fixtures", "exportcheck"]

S3_KEY, S3_SECRET = "testkey", "testsecret"

# Ray 2.60 turns token authentication on by default, with a token in ~/.ray/auth_token that the
# test process caches once. Every Ray of the session (the local one, multi-node clusters,
# `ray start` heads, CLI and job subprocesses) shares this one token from the environment
# instead, so the tests never depend on, or write, the user's ~/.ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex + uuid.uuid4().hex)


TIERS = {
    "ray": "needs Ray (the session's local Ray, a multi-node cluster, a `ray start` head)",
    "ceph": "needs Ceph's RADOS Gateway (real S3)",
    "browser": "needs headless Chromium",
    "subprocess": "starts a process (the klein-ray CLI, Ray, a compiler, a tool)",
    "slow": "takes tens of seconds or more",
}
BY_FIXTURE = {"ray_address": "ray", "rgw": "ceph", "chromium": "browser"}
FAST_TIER = os.environ.get("KLEIN_RAY_TEST_TIER") == "fast"


def pytest_configure(config):
    for name, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if FAST_TIER:
        _forbid_resources()


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


def _forbid_resources() -> None:
    """The fast tier's guard: no Ray, no process, whatever a test forgot to declare."""
    import importlib.abc

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError("the fast tier runs without Ray: mark this test `ray`")
            return None

    def no_process(self, *args, **kwargs):
        raise RuntimeError(f"the fast tier starts no process (asked for {args[:1]}): mark this test "
                           "`subprocess`")

    sys.meta_path.insert(0, NoRay())
    subprocess.Popen.__init__ = no_process  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from klein_ray.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": make_tiny_model(root / "tiny-klein", seed=0, distilled=True),
        "tiny-base": make_tiny_model(root / "tiny-klein-base", seed=1, distilled=False),
        # Laid out like BFL's 9B-KV (model_index.json names Flux2KleinKVPipeline); ~0.1 s to build.
        "tiny-kv": make_tiny_model(root / "tiny-klein-kv", seed=2, kv=True),
    }


@pytest.fixture(autouse=True)
def _cli_logging_undone():
    """A test that calls the CLI in-process leaves klein_ray's log handler on the stream pytest
    captured for it (closed once the test ends): undo it, so the next test logs as usual."""
    yield
    import logging

    logger = logging.getLogger("klein_ray")
    for handler in [h for h in logger.handlers if getattr(h, "_klein_ray", False)]:
        logger.removeHandler(handler)
    logger.propagate = True


@pytest.fixture(scope="session")
def chromium():
    """``open_in_chromium`` (tests/browser.py); fails, never skips, without the browser."""
    from browser import chromium_available, open_in_chromium

    if not chromium_available():
        pytest.fail("chromium is not installed: run `make system-deps` (make test does)")
    return open_in_chromium


@pytest.fixture(scope="session")
def ray_address():
    import ray

    # Actors inherit the environment of the process that starts Ray: give them the test
    # servers' credentials (the endpoint travels in the job config).
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment for a klein-ray process talking to this server."""
        return dict(os.environ, AWS_ENDPOINT_URL_S3=self.endpoint, AWS_ACCESS_KEY_ID=S3_KEY,
                    AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1",
                    AWS_EC2_METADATA_DISABLED="true")


@pytest.fixture(scope="session")
def rgw(tmp_path_factory):
    if not shutil.which("radosgw"):
        pytest.fail("radosgw is not installed: run `make system-deps` (make test does)")
    d = tmp_path_factory.mktemp("ceph")
    for attempt in range(2):  # a port taken between probing and binding: try fresh ones
        port = free_port()
        mon_port = next(p for p in iter(free_port, None) if p != port)
        proc = subprocess.run(["bash", str(REPO / "infra" / "ceph-rgw-up.sh"), str(d), str(port), str(mon_port)],
                              capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            break
        subprocess.run(["bash", str(REPO / "infra" / "ceph-rgw-down.sh"), str(d)])
    else:
        pytest.fail(f"Ceph RGW did not start (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    yield S3Server(f"http://127.0.0.1:{port}")
    subprocess.run(["bash", str(REPO / "infra" / "ceph-rgw-down.sh"), str(d)], timeout=60)


@pytest.fixture(scope="session")
def moto_s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"http://{host}:{port}")
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Point this process's klein-ray storage at a server (use with rgw or moto_s3)."""

    def apply(server: S3Server):
        for k, v in server.env().items():
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        from klein_ray.storage import reset_clients

        reset_clients()  # clients are shared per endpoint: build them from this environment
        return server

    return apply

"""`jobs/submit.py`: a render as a Ray Job on a running cluster, with klein-ray's exit code.

Against a real head (`ray start --head` with the dashboard, token auth, its own RAY_TMPDIR;
one for the module): the job's log ends in the JSON summary and its status follows the exit
code (0 SUCCEEDED; 1 and 2 FAILED); submitting the same render again is a new attempt id that
resumes and renders nothing; a submitter killed outright leaves its job running and the next
one attaches to it instead of starting a second driver; SIGTERM stops the job (130, STOPPED)
and the next submission resumes it. Without a cluster: the id scheme and the mapping of every
way a job can end to an exit code."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from helpers import assert_done, last_json, row, snapshot, stop_ray_under, write_config, write_manifest
from refgate import REFERENCES, RefGate

from klein_ray.cli import _parser
from klein_ray.storage import LocalStore

# Every test here needs Ray: jobs/submit.py is built on Ray's job submission client.
pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "jobs" / "submit.py"


def _load_submit():
    spec = importlib.util.spec_from_file_location("klein_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


submit = _load_submit()


# --- a real head -------------------------------------------------------------------------------

@dataclass
class Head:
    address: str
    env: dict[str, str]

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # Our cluster's token, explicitly: the SDK's own lookup keeps one token per process.
        token = self.env["RAY_AUTH_TOKEN"]
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def head():
    # Short: Ray's socket paths under it must fit in 107 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="krj-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # The job's driver inherits this environment: `klein-ray` on PATH, the cluster's own token
    # (never ~/.ray's), and every Ray record under tmpdir, not the machine's /tmp/ray.
    env.update(RAY_TMPDIR=str(tmpdir), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--metrics-export-port": free_port(),
             # fixed by default (52365, 10001): another cluster on the machine may hold them
             "--dashboard-agent-listen-port": free_port(), "--ray-client-server-port": free_port()}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--num-cpus=2",
           "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield Head(f"http://127.0.0.1:{dashboard}", env)
    finally:
        stop_ray_under(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _submit(head: Head, *args: str, env: dict | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, str(SUBMIT), *args, "--address", head.address],
                          env=env or head.env, capture_output=True, text=True, timeout=timeout)


def _submission_id(stderr: str) -> str:
    return re.search(r"(klein-[0-9a-f]{16}-a\d+) (SUCCEEDED|FAILED|STOPPED)", stderr).group(1)


def _job(tmp_path: Path, tiny_models, rows: list[dict], **extra) -> tuple[str, ...]:
    manifest = write_manifest(tmp_path / "m" / "manifest.parquet", rows)
    config = write_config(tmp_path / "job.yaml", tiny_models, **extra)
    return str(manifest), "--output", str(tmp_path / "out"), "--config", str(config)


def _rows(n: int, side: int = 64, steps: int = 2, prefix: str = "r") -> list[dict]:
    return [row(id=f"{prefix}{i:03d}", prompt=f"a lamp, angle {i}", width=side, height=side,
                steps=steps, seed=i) for i in range(n)]


@pytest.mark.slow
def test_a_render_as_a_ray_job_then_the_same_render_again_resumes(head, tmp_path, tiny_models):
    args = _job(tmp_path, tiny_models, _rows(3))
    first = _submit(head, *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = last_json(first.stdout)  # the job's log ends in klein-ray's summary
    assert (summary["total"], summary["committed"], summary["failed"]) == (3, 3, 0)
    job = head.client().get_job_info(_submission_id(first.stderr))
    assert (job.status.value, job.driver_exit_code) == ("SUCCEEDED", 0)
    before = snapshot(LocalStore(tmp_path / "out"))

    again = _submit(head, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = last_json(again.stdout)
    assert (summary["committed"], summary["skipped"], summary["failed"]) == (0, 3, 0)
    # A new attempt of the same render (Ray refuses a used submission id), that changed nothing.
    key = submit.render_key(args[0], args[2])
    assert (_submission_id(first.stderr), _submission_id(again.stderr)) == (f"{key}-a1", f"{key}-a2")
    assert snapshot(LocalStore(tmp_path / "out")) == before


@pytest.mark.slow
def test_failed_rows_exit_1_an_invalid_manifest_2_and_a_wrong_token_2(head, tmp_path, tiny_models):
    missing = str(tmp_path / "m" / "gone.png")  # inside the manifest's directory, but absent
    failing = _submit(head, *_job(tmp_path, tiny_models, [*_rows(1), row(
        id="nope", prompt="an edit of nothing", references=[missing], width=64, height=64, steps=2)]))
    assert failing.returncode == 1, failing.stdout[-3000:] + failing.stderr[-3000:]
    summary = last_json(failing.stdout)
    assert (summary["committed"], summary["failed"]) == (1, 1)
    assert (tmp_path / "out" / "_job" / "errors.parquet").is_file()
    job = head.client().get_job_info(_submission_id(failing.stderr))
    assert (job.status.value, job.driver_exit_code) == ("FAILED", 1)

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    invalid = _submit(head, str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "out2"))
    assert invalid.returncode == 2, invalid.stdout[-3000:] + invalid.stderr[-3000:]
    job = head.client().get_job_info(_submission_id(invalid.stderr))
    assert (job.status.value, job.driver_exit_code) == ("FAILED", 2)

    # A token the cluster refuses will not start working by itself: 2, not 75 (retry later).
    refused = _submit(head, str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "out3"),
                      env=dict(head.env, RAY_AUTH_TOKEN=secrets.token_hex(32)), timeout=60)
    assert refused.returncode == 2 and "refused our credentials" in refused.stderr, refused.stderr[-2000:]


AIRFLOW = REPO / ".venv-airflow" / "bin" / "airflow"  # make airflow-venv (make test builds it)


def _airflow_dags_test(tmp_path: Path, head: Head, config: str, day: str) -> subprocess.CompletedProcess:
    """The real Airflow (from the package index, in its own venv) running jobs/airflow_dag.py
    as deployed (the DAG and submit.py side by side in a dags folder) for one day."""
    if not AIRFLOW.is_file():
        pytest.fail(f"{AIRFLOW} is missing: run `make airflow-venv` (make test does)")
    dags = tmp_path / "dags"
    dags.mkdir(exist_ok=True)
    for name in ("airflow_dag.py", "submit.py"):
        shutil.copy(REPO / "jobs" / name, dags / name)
    home = tmp_path / "airflow-home"
    env = dict(head.env, AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", KLEIN_RAY_PYTHON=sys.executable,
               KLEIN_RAY_DASHBOARD=head.address, KLEIN_RAY_CONFIG=config)
    if not home.exists():
        migrated = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert migrated.returncode == 0, migrated.stderr[-3000:]
    conf = json.dumps({"manifest_root": str(tmp_path / "manifests"), "output_root": str(tmp_path / "renders")})
    return subprocess.run([str(AIRFLOW), "dags", "test", "klein_ray_render", day, "-c", conf], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_airflow_dag_renders_then_resumes_and_fails_for_good_on_a_bad_manifest(head, tmp_path, tiny_models):
    config = str(write_config(tmp_path / "job.yaml", tiny_models))
    write_manifest(tmp_path / "manifests" / "2026-12-01" / "m.parquet", _rows(2))
    first = _airflow_dags_test(tmp_path, head, config, "2026-12-01")
    log = first.stdout + first.stderr
    assert first.returncode == 0, log[-4000:]
    assert '"committed": 2' in log, log[-4000:]  # the summary is the task's return value
    assert not [line for line in log.splitlines() if "Deprecat" in line and "airflow_dag" in line]
    for i in range(2):
        assert_done(LocalStore(tmp_path / "renders" / "2026-12-01"), f"r{i:03d}")
    again = _airflow_dags_test(tmp_path, head, config, "2026-12-01")
    assert again.returncode == 0 and '"committed": 0' in again.stdout + again.stderr

    (tmp_path / "manifests" / "2026-12-02").mkdir()
    (tmp_path / "manifests" / "2026-12-02" / "m.parquet").write_bytes(b"PAR1 not parquet")
    bad = _airflow_dags_test(tmp_path, head, config, "2026-12-02")
    log = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "AirflowFailException: exit 2" in log, log[-4000:]
    assert "up_for_retry" not in log  # failed for good: no retry of what cannot pass by itself


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_lost_submitter_is_attached_to_and_sigterm_stops_the_job(head, tmp_path, tiny_models):
    # The rows' references are held back after the first two, until the stop has been sent:
    # the job is provably mid-run when it is stopped, however slowly the attach goes.
    gate = RefGate(free=2, held=10**6, auto_open=False)
    rows = gate.gated(_rows(32))
    args = _job(tmp_path, tiny_models, rows, references=REFERENCES)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    cmd = [sys.executable, str(SUBMIT), *args, "--address", head.address]

    def start(name: str) -> subprocess.Popen:
        with open(logs / f"{name}.out", "w") as stdout, open(logs / f"{name}.err", "w") as stderr:
            return subprocess.Popen(cmd, env=head.env, stdout=stdout, stderr=stderr)

    try:
        lost = start("lost")
        _wait_for(lambda: (out / "meta").is_dir() and any((out / "meta").iterdir()), "a first commit")
        lost.kill()  # the scheduler's worker died: its Ray job goes on
        lost.wait()
        attached = start("attached")
        _wait_for(lambda: "attaching" in (logs / "attached.err").read_text(), "the attach")
        attached.send_signal(signal.SIGTERM)  # the scheduler stops the task
        gate.open.set()  # what was in flight may land while the driver drains
        assert attached.wait(timeout=120) == 130, (logs / "attached.err").read_text()[-3000:]
        key = submit.render_key(args[0], args[2])
        job = head.client().get_job_info(f"{key}-a1")
        assert job.status.value == "STOPPED"
        summary = last_json((logs / "attached.out").read_text())  # the whole log, caught up
        assert summary["interrupted"] and summary["committed"] < len(rows)

        resumed = _submit(head, *args)
    finally:
        gate.close()
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _submission_id(resumed.stderr) == f"{key}-a2"
    final = last_json(resumed.stdout)
    assert final["skipped"] >= summary["committed"] and final["skipped"] + final["committed"] == len(rows)
    assert len(list((out / "meta").glob("*.json"))) == len(rows)

# --- without a cluster -------------------------------------------------------------------------

def test_the_entrypoint_is_a_render_our_cli_accepts():
    args = submit.parse_args(["s3://b/m/", "-o", "s3://b/o", "-c", "/etc/k/job 1.yaml", "--", "--verify"])
    argv = shlex.split(submit.entrypoint(args))
    assert argv[0] == "klein-ray"
    parsed = _parser().parse_args(argv[1:])
    assert (parsed.command, parsed.manifest, parsed.output, parsed.config) == (
        "render", "s3://b/m/", "s3://b/o", "/etc/k/job 1.yaml")
    assert parsed.no_progress and parsed.verify == "shallow" and parsed.address is None


def test_one_render_one_key_and_another_render_another():
    key = submit.render_key("s3://b/m/", "s3://b/o")
    assert key == submit.render_key("s3://b/m", "s3://b/o/")  # a trailing slash names the same
    assert key != submit.render_key("s3://b/m/", "s3://b/o2") != submit.render_key("s3://b/n/", "s3://b/o")
    assert re.fullmatch(r"klein-[0-9a-f]{16}", key)


def _info(status: str, code=None, error=None):
    from ray.job_submission import JobInfo, JobStatus

    return JobInfo(status=JobStatus(status), entrypoint="klein-ray render", driver_exit_code=code,
                   error_type=error)


@pytest.mark.parametrize(("status", "driver", "error", "code"), [
    ("SUCCEEDED", 0, None, 0),
    ("FAILED", 1, None, 1), ("FAILED", 2, None, 2), ("FAILED", 75, None, 75), ("FAILED", 130, None, 130),
    ("STOPPED", None, None, 130),                      # `ray job stop`, or our own stop
    # Codes klein-ray never gives fail for good: klein-ray missing on the head (127, before:
    # retried four times with backoff), not executable (126), killed by a signal.
    ("FAILED", 127, None, 2), ("FAILED", 126, None, 2), ("FAILED", 137, None, 2), ("FAILED", -9, None, 2),
    ("FAILED", None, "RUNTIME_ENV_SETUP_FAILURE", 2),   # the job as submitted cannot start
    ("FAILED", None, "JOB_SUPERVISOR_ACTOR_DIED", 75),  # the cluster's trouble
])
def test_every_way_a_job_ends_maps_to_a_klein_ray_exit_code(status, driver, error, code):
    from ray.dashboard.modules.job.common import JobErrorType

    info = _info(status, driver, JobErrorType(error) if error else None)
    assert submit.exit_code(info)[0] == code


class _FakeClient:
    """Ray's JobSubmissionClient as far as submit_or_attach uses it."""

    def __init__(self, jobs: dict[str, str], race: str | None = None):
        self.jobs, self.race, self.submitted = dict(jobs), race, []

    def list_jobs(self):
        return [type("Job", (), {"submission_id": k, "status": v}) for k, v in self.jobs.items()]

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        if self.race == submission_id:  # another submitter took it a moment ago
            self.jobs[submission_id], self.race = "RUNNING", None
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.submitted.append(submission_id)
        self.jobs[submission_id] = "PENDING"

    def get_address(self):
        return "http://head:8265"


@pytest.mark.parametrize(("jobs", "race", "expect", "submitted"), [
    ({}, None, "a1", ["a1"]),
    ({"a1": "FAILED", "a2": "STOPPED", "other-a9": "RUNNING"}, None, "a3", ["a3"]),
    ({"a1": "FAILED", "a2": "RUNNING"}, None, "a2", []),  # live: attach, never a second driver
    ({"a1": "SUCCEEDED"}, "a2", "a2", []),                # lost the race: attach to the winner
])
def test_a_new_attempt_unless_one_is_live(jobs, race, expect, submitted):
    args = submit.parse_args(["s3://b/m/", "--output", "s3://b/o"])
    key = submit.render_key(args.manifest, args.output)
    name = lambda s: s if s.startswith("other") else f"{key}-{s}"
    client = _FakeClient({name(k): v for k, v in jobs.items()}, race and name(race))
    assert submit.submit_or_attach(client, args) == name(expect)
    assert client.submitted == [name(s) for s in submitted]


@pytest.mark.subprocess
def test_an_unreachable_cluster_is_exit_75():
    proc = subprocess.run([sys.executable, str(SUBMIT), "m.parquet", "--output", "out",
                           "--address", f"http://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "cannot reach the Ray cluster" in proc.stderr and "Traceback" not in proc.stderr

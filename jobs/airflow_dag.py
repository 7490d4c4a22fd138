"""Example Airflow DAG: each day, render that day's manifest on a running Ray cluster.

The task runs ``jobs/submit.py`` (a Ray Job per attempt, its log copied into the task's log)
and turns klein-ray's exit code into Airflow's terms:

    0    success; the task returns klein-ray's JSON summary (its XCom)
    75   AirflowException: Airflow retries with backoff (storage or the cluster unreachable,
         the output's lease lost); the retry resumes, nothing committed renders twice
    1    AirflowFailException, no retry: rows failed (OUT/_job/errors.parquet); clearing the
         task after fixing their cause renders just those rows
    2    AirflowFailException, no retry: invalid manifest, config or invocation
    130  AirflowFailException, no retry: someone stopped the job; clear the task to resume

Deploy: copy this file and ``jobs/submit.py`` into the dags folder (or set KLEIN_RAY_SUBMIT);
the worker's Python needs ``ray[default]`` (KLEIN_RAY_PYTHON picks another interpreter), and
KLEIN_RAY_DASHBOARD names the cluster's dashboard. With token authentication on the cluster,
give the worker both RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (e.g. from an Airflow connection or
a secret backend): Ray's client sends the token only in token mode, and without it every
attempt fails for good with exit 2. Written for Airflow 2.7+ and 3 (3.3: the exceptions come
from ``airflow.sdk.exceptions``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3: the task SDK's own exceptions (airflow.exceptions' are deprecated in 3.3)
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2
    from airflow.exceptions import AirflowException, AirflowFailException

try:
    from airflow.sdk import dag, task  # Airflow 3
except ImportError:  # Airflow 2
    from airflow.decorators import dag, task

SUBMIT = Path(os.environ.get("KLEIN_RAY_SUBMIT", Path(__file__).with_name("submit.py")))
PYTHON = os.environ.get("KLEIN_RAY_PYTHON", sys.executable)
DASHBOARD = os.environ.get("KLEIN_RAY_DASHBOARD", "http://ray-head:8265")
CONFIG = os.environ.get("KLEIN_RAY_CONFIG", "/etc/klein-ray/job.yaml")  # a path on the head node
RETRY_LATER = 75
WHY = {
    1: "some rows failed: see OUT/_job/errors.parquet; clear the task to render them again",
    2: "invalid manifest, config or invocation: fix it; retrying would fail the same way",
    130: "the Ray job was stopped; clear the task to resume",
}
STOP_GRACE_S = 60  # submit.py waits up to 45 s for the stopped job to release the output


def submit_command(manifest: str, output: str, config: str | None = CONFIG,
                   extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [PYTHON, str(SUBMIT), manifest, "--output", output, "--address", DASHBOARD]
    if config:
        cmd += ["--config", config]
    return cmd + (["--", *extra] if extra else [])


def outcome(code: int, last_line: str) -> dict:
    """klein-ray's exit code in Airflow's terms: a return value, a retry, or a final failure."""
    if code == 0:
        try:
            return json.loads(last_line)
        except ValueError:  # the render succeeded; a log that ends oddly must not fail it
            return {"last_line": last_line}
    if code == RETRY_LATER:
        raise AirflowException("temporary failure (exit 75): retrying later resumes the render")
    raise AirflowFailException(f"exit {code}: {WHY.get(code, 'unexpected exit code; see the log')}")


def run_submit(cmd: list[str]) -> dict:
    """Run the submitter, copy its output into the task log, and judge its exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr: the task log as is
    last = ""
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            last = line if line.strip() else last
        code = proc.wait()
    except BaseException:
        # Airflow stopping the task (timeout, marked failed): SIGTERM makes submit.py stop the
        # Ray job too, so no render outlives its task.
        proc.terminate()
        proc.wait(timeout=STOP_GRACE_S)
        raise
    return outcome(code, last)


@dag(
    dag_id="klein_ray_render",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 4,  # they happen only on exit 75: outcome() fails the others for good
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(hours=1),
    },
    params={"manifest_root": "s3://catalog/manifests", "output_root": "s3://catalog/renders"},
)
def klein_ray_render():
    @task(execution_timeout=timedelta(hours=12))
    def render(manifest: str, output: str) -> dict:
        return run_submit(submit_command(manifest, output))

    # One manifest and one output per day: a re-run of that day resumes where it stopped.
    render(manifest="{{ params.manifest_root }}/{{ ds }}/", output="{{ params.output_root }}/{{ ds }}")


klein_ray_render()

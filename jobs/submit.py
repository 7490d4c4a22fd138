#!/usr/bin/env python3
"""Submit one ``klein-ray render`` to a running Ray cluster as a Ray Job, follow its logs, and
exit with klein-ray's own exit code, so a scheduler (Airflow, Argo, cron) can act on it:

    0 every row committed      1 some rows failed (OUT/_job/errors.parquet)
    2 invalid input: fix it, do not retry
    75 temporary: storage or the cluster unreachable, the lease lost: retry later
    (an exit code klein-ray never gives, 126, 127 or a signal, is 2: not retried)
    130 stopped (SIGTERM/Ctrl-C here, or `ray job stop`): re-run to resume

Usage (needs only ``ray[default]``, not klein-ray itself, on the submitting machine):

    python jobs/submit.py MANIFEST --output OUT [--config JOB.yaml] [--address http://head:8265]
                          [--working-dir DIR] [-- extra `klein-ray render` flags, e.g. --verify]

Submission ids. Ray refuses a second job with an existing submission id, and a render is
idempotent (re-running it resumes), so the id names the *attempt*, not the render:
``klein-<sha256(manifest, output)[:16]>-a<N>``. Each run of this script looks at the jobs the
cluster holds for that render: if one is still pending or running (the scheduler lost track of
it, e.g. its worker died), it attaches to it instead of starting a second driver (which the
output's lease would refuse); otherwise it submits attempt N+1. Two submitters racing for the
same N: Ray accepts one, the other attaches to it. A scheduler's retry is simply another run of
this script with the same arguments.

Paths (MANIFEST, OUT, --config) are read by the driver on the cluster, not here: use s3:// or
paths that exist on the head node (a mounted ConfigMap, a shared file system), or ship a local
directory with --working-dir (paths relative to it). Credentials come from the cluster's own
environment; nothing secret is sent with the job (job submissions are visible in the dashboard).
Ray's token authentication: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) as for `ray job submit`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
import shlex
import signal
import sys
import time

EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID, EXIT_TEMPFAIL, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
KLEIN_RAY_CODES = {EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID, EXIT_TEMPFAIL, EXIT_INTERRUPTED}
POLL_S = 2.0
# On `ray job stop` (ours on SIGTERM, or an operator's) Ray SIGTERMs the driver and SIGKILLs it
# after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default: too short for klein-ray, which lets in-flight
# commits land for 5 s, then writes its job log, summary and releases the output's lease.
# (A kill loses nothing committed; it only leaves the lease to expire and the summary unwritten.)
JOB_STOP_WAIT_S = 30
STOP_GRACE_S = JOB_STOP_WAIT_S + 15


def say(message: str) -> None:
    """The submitter's own lines go to stderr: stdout carries only the job's log, so its last
    line is klein-ray's JSON summary (Airflow's BashOperator pushes it as the task's XCom)."""
    print(f"klein-ray-submit: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="submit.py", description="Run `klein-ray render` as a Ray Job and exit with its code.",
        epilog="Arguments after `--` are passed to `klein-ray render` (e.g. -- --verify).")
    p.add_argument("manifest", help="manifest as the driver on the cluster sees it (s3:// or a path)")
    p.add_argument("--output", "-o", required=True, help="s3://bucket/prefix or a path on the cluster")
    p.add_argument("--config", "-c", help="job config YAML, a path on the cluster (e.g. a mounted ConfigMap)")
    p.add_argument("--address", help="the dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                   "then $RAY_ADDRESS, as for `ray job submit`)")
    p.add_argument("--working-dir", help="local directory uploaded as the job's working directory")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Split by hand: argparse would hand `-- --verify` to no positional once MANIFEST is taken.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.render_args = argv[cut + 1:]
    return args


def render_key(manifest: str, output: str) -> str:
    """The stable part of the submission id: the same render always maps to the same key."""
    digest = hashlib.sha256(f"{manifest.rstrip('/')}\n{output.rstrip('/')}".encode()).hexdigest()
    return f"klein-{digest[:16]}"


def entrypoint(args: argparse.Namespace) -> str:
    # --no-progress: a progress bar redrawn with \r is noise in a job log.
    cmd = ["klein-ray", "render", args.manifest, "--output", args.output, "--no-progress"]
    if args.config:
        cmd += ["--config", args.config]
    return shlex.join(cmd + list(args.render_args))


def attempts(client, key: str) -> dict[int, object]:
    """This render's jobs on the cluster, by attempt number."""
    pattern = re.compile(re.escape(key) + r"-a(\d+)")
    found = {}
    for job in client.list_jobs():
        match = pattern.fullmatch(job.submission_id or "")
        if match:
            found[int(match.group(1))] = job
    return found


def submit_or_attach(client, args: argparse.Namespace) -> str:
    """Attach to this render's live job if there is one, else submit the next attempt."""
    from ray.job_submission import JobStatus

    key = render_key(args.manifest, args.output)
    # The job supervisor, which stops the driver, reads its environment from these too.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1",  # log lines as they happen
                                "RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S)}}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    for _ in range(5):  # each lost race means someone else submitted: look again
        jobs = attempts(client, key)
        live = [n for n, job in jobs.items() if not JobStatus(job.status).is_terminal()]
        if live:
            submission_id = f"{key}-a{max(live)}"
            say(f"{submission_id} is already {jobs[max(live)].status}: attaching to it")
            return submission_id
        submission_id = f"{key}-a{max(jobs, default=0) + 1}"
        try:
            client.submit_job(entrypoint=entrypoint(args), submission_id=submission_id,
                              runtime_env=runtime_env,
                              metadata={"klein_ray_render": key, "manifest": args.manifest,
                                        "output": args.output})
        except RuntimeError as exc:
            if "already exists" in str(exc):
                continue
            raise
        say(f"submitted {submission_id} to {client.get_address()}: {entrypoint(args)}")
        return submission_id
    raise RuntimeError(f"could not claim a submission id for {key} (other submitters keep racing)")


class LogFollower:
    """Copies a job's log to stdout: streamed while the job runs, and whatever the stream missed
    (it broke, or the job ended before it connected) from the full log at the end."""

    def __init__(self, client, submission_id: str):
        self.client, self.submission_id, self.printed = client, submission_id, 0

    def _emit(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.printed += len(text)

    async def _tail(self) -> None:
        async for chunk in self.client.tail_job_logs(self.submission_id):
            self._emit(chunk)

    def stream(self) -> None:
        try:
            asyncio.run(self._tail())
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream is a convenience; the log is not lost
            say(f"log stream broke ({type(exc).__name__}: {exc}); polling the job instead")

    def catch_up(self) -> None:
        try:
            full = self.client.get_job_logs(self.submission_id)
        except Exception as exc:  # noqa: BLE001 - the exit code matters more than the log
            say(f"could not read the job's log: {exc}")
            return
        # The stream and the full log are the same bytes: print only what the stream missed.
        if len(full) > self.printed:
            self._emit(full[self.printed:])


def wait_terminal(client, submission_id: str, timeout: float | None = None):
    """The job's JobInfo once it reaches a terminal state (None if `timeout` passes first)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal():
            return info
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def _unknown_exit(code: int) -> str:
    if code == 127:
        return "command not found: is klein-ray installed where the job runs?"
    if code == 126:
        return "command not executable"
    if code < 0 or code > 128:
        return f"killed by signal {-code if code < 0 else code - 128}"
    return "not an exit code klein-ray gives"


def exit_code(info) -> tuple[int, str]:
    """klein-ray's exit code for a finished job, and why, for schedulers that act on it."""
    from ray.job_submission import JobStatus

    code = info.driver_exit_code
    if info.status == JobStatus.SUCCEEDED:
        return EXIT_OK, "succeeded"
    if code in KLEIN_RAY_CODES:
        return code, f"klein-ray exited {code}"
    if info.status == JobStatus.STOPPED:
        return EXIT_INTERRUPTED, "the job was stopped (`ray job stop`); re-run to resume"
    if code is not None:
        # A code klein-ray never gives: the command could not run (126: not executable, 127:
        # not found: klein-ray is not installed on the head), or the driver was killed by a
        # signal (negative, or 128 + the signal). None of these passes by itself, so it is a
        # failure to look at, not "try later": a retry would fail the same way, with backoff.
        return EXIT_INVALID, f"the driver exited {code} ({_unknown_exit(code)}); see the job's log"
    error = str(getattr(info.error_type, "value", info.error_type) or "")
    if error in ("RUNTIME_ENV_SETUP_FAILURE", "JOB_ENTRYPOINT_COMMAND_START_ERROR"):
        return EXIT_INVALID, f"the job could not start ({error}): {info.message}"
    # The job supervisor died or could not be scheduled: the cluster's trouble, not the job's.
    return EXIT_TEMPFAIL, f"the job failed on the cluster ({error or 'no driver exit code'}): {info.message}"


def stop_job(client, submission_id: str) -> None:
    """SIGTERM/Ctrl-C here (a scheduler killing the task): stop the job too, so a retry does
    not find it still running; klein-ray releases the output's lease and exits 130."""
    say(f"interrupted: stopping {submission_id}")
    try:
        client.stop_job(submission_id)
        if wait_terminal(client, submission_id, timeout=STOP_GRACE_S) is None:
            say(f"{submission_id} did not stop within {STOP_GRACE_S:.0f} s; a re-run will attach to it")
    except Exception as exc:  # noqa: BLE001 - we are exiting either way
        say(f"could not stop {submission_id}: {exc}")


def run(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs each websocket close at INFO on stderr; our own lines say what happened.
    # (After importing ray: its import configures its loggers.)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    client = JobSubmissionClient(args.address)
    submission_id = submit_or_attach(client, args)
    follower = LogFollower(client, submission_id)
    try:
        follower.stream()
        info = wait_terminal(client, submission_id)
    except KeyboardInterrupt:
        stop_job(client, submission_id)
        follower.catch_up()
        return EXIT_INTERRUPTED
    follower.catch_up()
    code, why = exit_code(info)
    say(f"{submission_id} {info.status.value}: exit {code} ({why})")
    return code


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # Airflow and Argo stop a task with SIGTERM
    args = parse_args(argv)
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        say("needs ray[default] (`pip install 'ray[default]'`)")
        return EXIT_INVALID
    try:
        return run(args)
    except KeyboardInterrupt:  # before a job existed: nothing to stop
        say("interrupted before submitting")
        return EXIT_INTERRUPTED
    except AuthenticationError as exc:  # a missing or wrong token will not fix itself
        say(f"the cluster refused our credentials: {exc}")
        return EXIT_INVALID
    except (ConnectionError, TimeoutError, OSError) as exc:
        say(f"cannot reach the Ray cluster: {exc}; retry later")
        return EXIT_TEMPFAIL
    except RuntimeError as exc:  # the job API answered with an error (5xx, a lost race)
        say(f"the Ray job API failed: {exc}; retry later")
        return EXIT_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())

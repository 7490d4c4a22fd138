"""Command line: `klein-ray render | validate | status | verify | export | expand | report |
reroll | demo | make-tiny-model | make-tiny-lora`.

Each command parses its arguments, calls one function of ``klein_ray.commands``, and turns
known failures into a clear one-line message and its documented exit code (no tracebacks for user
errors). This is the one place that configures logging: library code logs, it never prints;
stdout carries only each command's results (``render``'s last line is its JSON summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from klein_ray.cli import datasets
from klein_ray.commands.render import EXECUTORS, render
from klein_ray.config import ConfigError, load_config
from klein_ray.intake.manifest import ManifestError
from klein_ray.output.lease import LeaseHeld
from klein_ray.scheduling.driver import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_TEMPFAIL, RenderJob
from klein_ray.scheduling.stopping import TRY_LATER
from klein_ray.startup import interrupted_before_start, own_stop_signals, stop_asked
from klein_ray.storage import StorageError
from klein_ray.storage.base import StorageUnavailable
from klein_ray.uris import scrub


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="klein-ray", description="Batch rendering of FLUX.2 [klein] "
                                "manifests on Ray into S3-compatible storage.")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="stderr log lines as text (default) or JSON lines for log shippers "
                   "(also KLEIN_RAY_LOG_FORMAT)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _render_parser(sub)
    _audit_parsers(sub)
    datasets.add_parsers(sub)
    _setup_parsers(sub)
    return p


def _render_parser(sub) -> None:
    r = sub.add_parser("render", help="render every row of a manifest (re-run to resume)",
                       description="Render every row of MANIFEST into OUT. Re-running the same "
                       "command resumes: committed rows are skipped. Exit codes: 0 all rows "
                       "committed, 1 some rows failed (see OUT/_job/errors.parquet), 2 invalid "
                       "invocation/config/manifest, 75 storage unreachable (run it again later), "
                       "130 interrupted.")
    r.add_argument("manifest", help="Parquet file, directory of Parquet files, or s3:// prefix")
    r.add_argument("--output", "-o", required=True, help="s3://bucket/prefix or a local directory")
    r.add_argument("--config", "-c", help="job config YAML (default: one CPU variant, the tiny model)")
    r.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.add_argument("--verify", action="store_const", const="shallow", dest="verify",
                   help="first audit every committed row (as `klein-ray verify`) and render the "
                   "broken ones again, replacing their image and marker")
    r.add_argument("--verify-deep", action="store_const", const="deep", dest="verify",
                   help="the same, downloading and hashing every image")
    r.add_argument("--rerender-outdated", action="store_true",
                   help="also render again the rows committed under another setup of their variant "
                   "(model, weights, precision or encoding changed under the same variant name)")
    r.add_argument("--executor", choices=EXECUTORS, default="ray",
                   help="ray (default): workers are Ray actors; local: workers run on threads of "
                   "this process, without Ray (a laptop, a debugger)")


def _audit_parsers(sub) -> None:
    """The commands that read a manifest or an output and change nothing."""
    v = sub.add_parser("validate", help="check a manifest without rendering",
                       description="Print every problem of MANIFEST (row id, column, reason); "
                       "exit 0 if clean, 2 if not.")
    v.add_argument("manifest")
    v.add_argument("--config", "-c")
    v.add_argument("--check-references", action="store_true",
                   help="also fetch and decode every reference (size caps and address rules apply)")
    v.add_argument("--output", "-o", help="the output the job will write to: its bucket is then "
                   "allowed for s3:// references, as `render` allows it (nothing is written there)")

    s = sub.add_parser("status", help="committed / failed / remaining counts of an output",
                       description="Counts from storage alone (no Ray). The last line is JSON.")
    s.add_argument("output")
    s.add_argument("--config", "-c", help="job config (for storage settings)")
    s.add_argument("--markers", action="store_true", help="list every marker even when the output "
                   "is large (by default an output of more than a million rows is counted from its "
                   "checkpoint, and the rows it does not name are looked up only when few)")
    _verify_parser(sub)


def _verify_parser(sub) -> None:
    f = sub.add_parser("verify", help="audit every committed row of an output",
                       description="Check every row the output says is committed: marker, image "
                       "key, size and sha256 (--deep downloads and hashes every image). Prints "
                       "each broken row (id, problem), then a JSON summary; exit 0 if none is "
                       "broken, 1 if some are (`render --verify` repairs them). The rows are "
                       "judged in shards of 10,000, as Ray tasks with --executor ray.")
    f.add_argument("output")
    f.add_argument("--deep", action="store_true", help="download and hash every image")
    f.add_argument("--config", "-c", help="job config (for storage settings)")
    f.add_argument("--sample", type=int, metavar="N", help="judge N committed rows drawn uniformly "
                   "(seeded) instead of all; the summary says what was sampled and the upper bound "
                   "(95%%) on the broken fraction")
    f.add_argument("--seed", type=int, default=0, help="the --sample draw (default 0: the same rows each time)")
    f.add_argument("--executor", choices=("auto", *EXECUTORS), default="auto",
                   help="where the shards are judged: ray (tasks on the cluster), local (threads "
                   "here); auto: ray when --address or RAY_ADDRESS names a cluster, else local")
    f.add_argument("--address", help="Ray cluster address for --executor ray (default: $RAY_ADDRESS)")


def _setup_parsers(sub) -> None:
    d = sub.add_parser("demo", help="render the sample manifest with the tiny model on a local Ray",
                       description="Build the tiny offline models if missing and render "
                       "manifests/example.parquet; writes images, metadata and _job/report.html.")
    d.add_argument("--output", "-o", default="demo-output")

    m = sub.add_parser("make-tiny-model", help="write the tiny random FLUX.2 klein pipeline",
                       description="Write a small randomly initialised Flux2KleinPipeline in "
                       "diffusers layout, offline. Its images are noise.")
    m.add_argument("directory")
    kind = m.add_mutually_exclusive_group()  # a KV checkpoint is distilled
    kind.add_argument("--base", action="store_true", help="mark it undistilled (Base: CFG, 50 steps)")
    kind.add_argument("--kv", action="store_true",
                      help="a KV checkpoint: model_index.json names Flux2KleinKVPipeline, like BFL's 9B-KV")
    m.add_argument("--seed", type=int, default=0)

    lora = sub.add_parser("make-tiny-lora", help="write a random LoRA for the tiny model",
                          description="Write a random LoRA adapter for the tiny model at MODEL_DIR, as "
                          "diffusers' save_lora_weights writes one, into LORA_DIR. Its effect is plain "
                          "and meaningless: it exists to test adapters.")
    lora.add_argument("model_dir")
    lora.add_argument("lora_dir")
    lora.add_argument("--seed", type=int, default=0)


class Scrubbed(logging.Filter):
    """Every log line through ``uris.scrub``: no URL's query, userinfo or credential, whatever
    a library's message quoted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        return True


LOG_FORMATS = ("text", "json")
# The fields run events carry beside their message (``extra=`` at the call); nothing else of a
# record is copied into a JSON line, so no argument can carry a secret there by accident.
EVENT_FIELDS = ("event", "run_id", "variant", "unit", "attempt", "rows", "workers", "exit_code",
                "committed", "skipped", "failed", "seconds", "settings", "warmup", "load_seconds")


class JsonLines(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message, and the run
    event's fields (``event``: run_start, worker_loaded, variant_ready, variant_failed,
    unit_retried, worker_lost, run_stopping, run_finish)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        line.update({k: getattr(record, k) for k in EVENT_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(line, default=str)


JsonLines.converter = time.gmtime  # UTC, as the Z says


def configure_logging(level: int = logging.INFO, fmt: str | None = None) -> None:
    """klein-ray's log lines on stderr: prefixed text like its other messages, or JSON lines
    (``--log-format json`` or ``KLEIN_RAY_LOG_FORMAT=json``). Idempotent."""
    fmt = fmt or os.environ.get("KLEIN_RAY_LOG_FORMAT") or "text"
    logger = logging.getLogger("klein_ray")
    handler = next((h for h in logger.handlers if getattr(h, "_klein_ray", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._klein_ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    elif isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
        handler.setStream(sys.stderr)  # called again (embedded use, tests): today's stderr
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter("klein-ray: %(message)s"))
    if not any(isinstance(f, Scrubbed) for f in handler.filters):
        handler.addFilter(Scrubbed())
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    own_stop_signals()  # (again: `main` is also called without `python -m klein_ray`)
    args = _parser().parse_args(argv)
    configure_logging(fmt=args.log_format)
    return _run(args)


def _run(args) -> int:
    """The command, with known failures turned into one line and their exit code."""
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, ManifestError, LeaseHeld) as exc:
        print(f"klein-ray: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except StorageUnavailable as exc:  # before StorageError: it is one, but temporary
        print(f"klein-ray: storage unreachable: {exc}; {TRY_LATER}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except StorageError as exc:
        print(f"klein-ray: storage error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:  # a local output or input path that cannot be used (not a directory...)
        print(f"klein-ray: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception:
        if not stop_asked():
            raise
        # A library swallowed the interrupt and failed after it (see ``startup``): the stop is
        # what happened, the failure only its echo.
        logging.getLogger(__name__).debug("failed after a stop was asked", exc_info=True)
        return _interrupted(args.command)


def _interrupted(command: str) -> int:
    if command == "render":  # before the driver ran: its run() turns later stops into a summary
        return interrupted_before_start([command])
    print("klein-ray: interrupted; re-run the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_render(args) -> int:
    config = load_config(args.config)
    job = RenderJob(args.manifest, args.output, config, verify_first=args.verify,
                    rerender_outdated=args.rerender_outdated)
    summary, code = render(job, args.executor, args.address, progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    return code


def cmd_validate(args) -> int:
    from klein_ray.commands.validate import validate_manifest

    config = load_config(args.config)
    problems = validate_manifest(args.manifest, config, check_references=args.check_references,
                                 output=args.output)
    for p in problems:
        print(f"{p.manifest_file}: row {p.manifest_row} id={p.id} column={p.column or '-'}: {p.message}")
    rows = {(p.manifest_file, p.manifest_row) for p in problems}
    print(json.dumps({"problems": len(problems), "rows_with_problems": len(rows)}))
    return EXIT_INVALID if problems else 0


def cmd_status(args) -> int:
    from klein_ray.commands.status import output_status
    from klein_ray.scheduling.resume import spill_dir

    config = load_config(args.config)
    st = output_status(args.output, config.storage, markers=args.markers, tmp_dir=spill_dir(config))
    if st.total is None and st.committed == 0 and st_missing(args.output, config):
        print(f"klein-ray: no klein-ray output at {args.output} (no _job/state.json)", file=sys.stderr)
        return EXIT_INVALID
    total = st.total if st.total is not None else "-"
    print(f"output:    {args.output}\nmanifest:  {st.manifest or '-'}\ntotal:     {total}")
    if st.progress:
        p = st.progress
        eta = f", ETA {p['eta_seconds']:.0f} s" if p.get("eta_seconds") is not None else ""
        why = f" ({p['why']})" if p.get("why") else ""
        print(f"last run:  {p['run_id']} {p['state']}{why} (updated {p['updated_at']}): "
              f"{p['committed_this_run']} committed, {p['in_flight']} in flight, "
              f"{p['rows_per_second']} rows/s{eta}")
    print(f"counted:   {st.requests}")
    print(json.dumps(st.counts()))
    return 0


def st_missing(output: str, config) -> bool:
    """No job ever wrote to ``output`` (its state file is absent)."""
    from klein_ray.output.joblog import read_state
    from klein_ray.storage import open_store

    return read_state(open_store(output, config.storage)) is None


def cmd_verify(args) -> int:
    from klein_ray.commands.verify import shard_executor, verify_output
    from klein_ray.scheduling.resume import spill_dir

    config = load_config(args.config)
    executor = shard_executor(args.executor, args.address, config.run.ray_join_timeout_s)
    try:
        found = verify_output(args.output, deep=args.deep, storage=config.storage, executor=executor,
                              sample=args.sample, seed=args.seed, tmp_dir=spill_dir(config))
    finally:
        executor.shutdown([])
    try:
        if found.report.checked == 0 and st_missing(args.output, config):
            print(f"klein-ray: no klein-ray output at {args.output} (nothing committed, no _job/state.json)",
                  file=sys.stderr)
            return EXIT_INVALID  # a mistyped path must not read as "every row sound"
        for line in found.lines():
            print(line)
        print(json.dumps(found.as_dict()))
    finally:
        found.close()
    return 1 if found.report.broken else 0


def cmd_demo(args) -> int:
    from klein_ray.commands import demo

    output = str(Path(args.output).absolute())
    os.chdir(demo.REPO)  # jobs/demo.yaml names the tiny models relative to the repository root
    demo.ensure_tiny_models(demo.REPO)
    manifest = demo.REPO / "manifests" / "example.parquet"
    if not manifest.is_file():
        demo.write_example(manifest.parent)
    config = load_config(demo.REPO / "jobs" / "demo.yaml")
    summary, code = render(RenderJob(str(manifest), output, config))
    print(f"report: {output}/_job/report.html  (images come from a random test model: noise)")
    print(json.dumps(summary), flush=True)
    return code


def cmd_make_tiny_model(args) -> int:
    from klein_ray.model.tiny import make_tiny_model

    path = make_tiny_model(args.directory, seed=args.seed, distilled=not args.base, kv=args.kv)
    print(f"wrote a tiny random FLUX.2 klein pipeline to {path} (its images are noise)")
    return 0


def cmd_make_tiny_lora(args) -> int:
    from klein_ray.model.tiny import make_tiny_lora

    path = make_tiny_lora(args.model_dir, args.lora_dir, seed=args.seed)
    print(f"wrote a tiny random LoRA to {path} (for the tiny model: its effect is noise too)")
    return 0


_COMMANDS = {"render": cmd_render, "validate": cmd_validate, "status": cmd_status,
             "verify": cmd_verify, **datasets.COMMANDS, "demo": cmd_demo, "make-tiny-model": cmd_make_tiny_model,
             "make-tiny-lora": cmd_make_tiny_lora}

if __name__ == "__main__":
    sys.exit(main())

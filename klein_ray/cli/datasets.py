"""The dataset commands' arguments and calls: ``expand``, ``report``, ``reroll`` (the catalog
loop, docs/catalog.md) and ``export`` (datasets, docs/datasets.md). Registered by the CLI's
parser; their failures are turned into one line and an exit code by ``klein_ray.cli._run``.
"""

from __future__ import annotations

import json
import sys

from klein_ray.commands.render import EXECUTORS
from klein_ray.config import load_config
from klein_ray.scheduling.stopping import EXIT_TEMPFAIL


def add_parsers(sub) -> None:
    _catalog_parsers(sub)
    _export_parser(sub)


def _catalog_parsers(sub) -> None:
    """The catalog loop: expand a catalog, review its render, render the rejected shots again."""
    e = sub.add_parser("expand", help="write a manifest from a catalog: products x scenes x seeds",
                       description="Expand CATALOG (YAML: a products table, scenes, seeds and "
                       "templates; docs/catalog.md) into a manifest. Exit 2, nothing written, on any "
                       "problem (the message names the key, the product row and the reason).")
    e.add_argument("catalog", metavar="CATALOG")
    e.add_argument("--output", "-o", required=True, metavar="MANIFEST",
                   help="the manifest to write: a .parquet path or s3:// key")
    e.add_argument("--config", "-c", help="the job config it is for: variants are checked, guidance "
                   "on distilled variants warned about")

    r = sub.add_parser("report", help="build an output's review page again (groups, rejects)",
                       description="Rebuild OUT's report page from its job log and markers.")
    r.add_argument("output_dir", metavar="OUT")
    r.add_argument("--group-by", help="sections by this column (a passthrough column such as sku)")
    r.add_argument("--output", "-o", metavar="PATH", help="write the page here: a local file or s3:// key "
                   "(default: OUT/_job/report.html)")
    r.add_argument("--config", "-c", help="job config (for storage settings)")

    f = sub.add_parser("reroll", help="write the rejected shots of a review as a manifest to render again",
                       description="Read REJECTS (the file the report page downloads, or ids one a line), "
                       "find the rows in OUT's manifest and write them with new ids (ID.r2, ID.r3...) and "
                       "new seeds to MANIFEST; render it into OUT: the new shots land beside the old.")
    f.add_argument("output_dir", metavar="OUT")
    f.add_argument("rejects", metavar="REJECTS")
    f.add_argument("--output", "-o", required=True, metavar="MANIFEST",
                   help="the manifest to write: a .parquet path or s3:// key")
    f.add_argument("--manifest", action="append", default=[], metavar="EARLIER",
                   help="also look rows up in this manifest (an earlier pass's); repeatable")
    f.add_argument("--config", "-c", help="job config (for storage settings)")


def _export_parser(sub) -> None:
    e = sub.add_parser("export", help="the committed rows of an output as WebDataset shards or a "
                       "Hugging Face Parquet dataset",
                       description="Pack the committed rows of OUT into DEST, shard k holding the "
                       "manifest rows [k*N, (k+1)*N). Re-running resumes: complete shards whose rows "
                       "are unchanged are skipped, the others rebuilt. Exit codes: 0 every committed "
                       "row exported, 2 invalid invocation, 75 storage unreachable or rows changed "
                       "while exporting (run it again), 130 interrupted.")
    e.add_argument("output", help="the klein-ray output (OUT): s3://bucket/prefix or a local directory")
    e.add_argument("--format", "-f", required=True, choices=("webdataset", "parquet"))
    e.add_argument("--to", required=True, dest="dest", help="where the dataset goes: a directory or "
                   "s3:// prefix of its own")
    e.add_argument("--rows-per-shard", type=int, default=1000, metavar="N",
                   help="manifest rows per shard (default 1000)")
    e.add_argument("--max-shard-bytes", type=int, default=1 << 30, metavar="B",
                   help="a shard whose samples would pass B bytes is written as several files "
                   "(default 1 GiB)")
    e.add_argument("--config", "-c", help="job config (for storage settings)")
    e.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (default): shards built on threads of this process; ray: as Ray tasks")
    e.add_argument("--address", help="Ray cluster address (with --executor ray)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cmd_expand(args) -> int:
    from klein_ray.commands.expand import expand

    result = expand(args.catalog, args.output, load_config(args.config) if args.config else None)
    for warning in result.warnings:
        print(f"klein-ray: warning: {warning}", file=sys.stderr)
    print(json.dumps(result.summary()), flush=True)
    return 0


def cmd_report(args) -> int:
    from klein_ray.commands.report import rebuild_report

    result = rebuild_report(args.output_dir, args.group_by, args.output, load_config(args.config).storage)
    print(json.dumps(result.summary()), flush=True)
    return 0


def cmd_reroll(args) -> int:
    from klein_ray.commands.reroll import reroll

    result = reroll(args.output_dir, args.rejects, args.output, load_config(args.config).storage, args.manifest)
    for old, new in result.renamed:
        print(f"{old}\t{new}")
    print(json.dumps(result.summary()), flush=True)
    return 0


def cmd_export(args) -> int:
    from klein_ray.commands.export import export_output
    from klein_ray.output.export.shard import ShardConflict

    config = load_config(args.config)
    try:
        summary = export_output(args.output, args.format, args.dest, rows_per_shard=args.rows_per_shard,
                                max_shard_bytes=args.max_shard_bytes, storage=config.storage,
                                executor=args.executor, address=args.address, progress=not args.no_progress)
    except ShardConflict as exc:
        print(f"klein-ray: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    print(json.dumps(summary.as_dict()), flush=True)
    return 0



COMMANDS = {"export": cmd_export, "expand": cmd_expand, "report": cmd_report, "reroll": cmd_reroll}

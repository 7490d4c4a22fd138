"""Export throughput and memory: `klein-ray export` against a plain `tarfile` loop over the
same images, in the same run, and peak RSS as the output grows tenfold.

    python benchmarks/export.py --rows 100000 --rows 1000000 [--dir /tmp/kr-export-bench]

For each size, a synthetic output is written straight to disk in the layout a render leaves
(`images/{id}.png` with the sha256 sidecar LocalStore keeps, `meta/{id}.json` markers the
ledger's predicate passes, `_job/state.json` naming a manifest of the rows): cheap, and the
export cannot tell it from a rendered one. Small PNGs (256 distinct 32x32 noise images, ~3 KB)
keep it to seconds per 100k rows. Then, each in a fresh child process (its own peak RSS):

- baseline: one `tarfile` loop reading every row's marker and image and writing one tar (no
  ledger, no shards, no sorted headers: the least work that packs the same bytes);
- export: `klein-ray export OUT --format webdataset` (local executor, default shard size).

Prints rows/s, MB/s (image bytes per second) and peak RSS for both, one line each.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTINCT = 256


def images() -> list[bytes]:
    from PIL import Image

    rng = __import__("random").Random(0)
    found = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        Image.frombytes("RGB", (32, 32), bytes(rng.getrandbits(8) for _ in range(32 * 32 * 3))).save(buf, "PNG")
        found.append(buf.getvalue())
    return found


def synthesize(out: Path, rows: int) -> int:
    """The output of ``rows`` committed rows; returns the image bytes in it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = images()
    shas = [hashlib.sha256(p).hexdigest() for p in pngs]
    (out / "images").mkdir(parents=True)
    (out / "meta").mkdir()
    (out / "_job").mkdir()
    (out / "pool").mkdir()  # each distinct image and sidecar once; rows hard-link them (cheap)
    for n, (png, sha) in enumerate(zip(pngs, shas)):
        (out / "pool" / f"{n}.png").write_bytes(png)
        sidecar = {"epoch": "1", "fingerprint": "", "sha256": sha}
        (out / "pool" / f"{n}.meta").write_text(json.dumps(sidecar, sort_keys=True))
    total = 0
    for i in range(rows):
        row_id, png, sha = f"row-{i:08d}", pngs[i % DISTINCT], shas[i % DISTINCT]
        os.link(out / "pool" / f"{i % DISTINCT}.png", out / "images" / f"{row_id}.png")
        os.link(out / "pool" / f"{i % DISTINCT}.meta", out / "images" / f".{row_id}.png.{sha}.meta")
        marker = {"id": row_id, "prompt": f"a product shot number {i}", "seed": i, "width": 32, "height": 32,
                  "variant": "tiny", "format": "png", "passthrough": {"sku": f"sku-{i}"}, "epoch": 1,
                  "image": {"key": f"images/{row_id}.png", "sha256": sha, "bytes": len(png),
                            "content_type": "image/png"}}
        (out / "meta" / f"{row_id}.json").write_text(json.dumps(marker))
        total += len(png)
    ids = pa.array([f"row-{i:08d}" for i in range(rows)])
    table = pa.table({"id": ids, "prompt": pa.array([f"a product shot number {i}" for i in range(rows)]),
                      "seed": pa.array(range(rows), pa.int64())})
    pq.write_table(table, out / "manifest.parquet")
    state = {"manifest": str(out / "manifest.parquet"), "total": rows, "run_id": "bench"}
    (out / "_job" / "state.json").write_text(json.dumps(state))
    return total


def baseline(out: Path, dest: Path) -> None:
    """The plain loop: every marker and image into one tar, in id order."""
    import tarfile

    dest.mkdir(parents=True)
    with tarfile.open(dest / "all.tar", "w") as tar:
        for name in sorted(os.listdir(out / "meta")):
            marker = json.loads((out / "meta" / name).read_bytes())
            image = (out / marker["image"]["key"]).read_bytes()
            key = name[: -len(".json")].replace(".", "_")
            for ext, data in (("png", image), ("txt", marker["prompt"].encode()),
                              ("json", json.dumps(marker).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def child(kind: str, out: Path, dest: Path) -> None:
    started = time.perf_counter()
    if kind == "baseline":
        baseline(out, dest)
    else:
        from klein_ray.cli import main

        code = main(["export", str(out), "--format", "webdataset", "--to", str(dest), "--no-progress"])
        assert code == 0, code
    seconds = time.perf_counter() - started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mib": rss_mib}), file=sys.stderr)


def measure(kind: str, out: Path, dest: Path) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(out), str(dest)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stderr.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, action="append")
    p.add_argument("--dir", default="/tmp/kr-export-bench")
    p.add_argument("--child", nargs=3, metavar=("KIND", "OUT", "DEST"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}")
    for rows in args.rows or [100_000]:
        root = Path(args.dir) / f"{rows}"
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        image_bytes = synthesize(root / "out", rows)
        print(f"{rows} rows: synthetic output in {time.perf_counter() - started:.0f} s "
              f"({image_bytes / 1e6:.0f} MB of images)", flush=True)
        for kind in ("baseline", "export"):
            found = measure(kind, root / "out", root / kind)
            s = found["seconds"]
            print(f"  {kind:8s}: {s:7.1f} s  {rows / s:8.0f} rows/s  {image_bytes / 1e6 / s:6.2f} MB/s  "
                  f"peak RSS {found['rss_mib']:.0f} MiB", flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

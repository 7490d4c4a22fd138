"""The hostile tests' fixtures (registered by conftest as a plugin, so that the hostile render
and the allow-list render run ONCE a session, whichever test_hostile*.py module asks first):
local HTTP servers on 127.0.0.1, ::1 and 127.0.0.2 that record every request; one render of the
hostile manifest on the session's Ray; one small render that opens 127.0.0.1 through
`references.allow_private_hosts`; and the snapshots the tests judge them by (the file tree,
/tmp, the servers' logs, secrets in streams and files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from helpers import row, run_cli, write_manifest
from hostile_inputs import (
    REDIRECT_SECRET,
    SECRET_KEY,
    SECRETS,
    SESSION_TOKEN,
    SIGNED_QUERY,
    Case,
    hostile_cases,
    pattern,
    save_image,
    write_inputs,
    write_job,
    write_manifest_dir,
)
from hostile_server import Recorder, declared_big, redirect, send_bytes, stream_big

from klein_ray.storage import LocalStore

# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------

def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            # The session's Ceph (if another test started it) logs on its own: not ours to judge.
            dirnames[:] = [d for d in dirnames if not d.startswith("ceph")]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p)] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns if not p.is_dir() else 0)
    return out


def tmp_escapes() -> set[str]:
    # Other sessions share /tmp: only names an escaping id could have produced are checked here;
    # the job's own temporary files go to a TMPDIR inside the snapshotted tree.
    return {n for n in os.listdir("/tmp") if "escape" in n.lower()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def secret_env(tmpdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_SESSION_TOKEN=SESSION_TOKEN)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def leaks_in_tree(root: Path) -> dict[str, list[str]]:
    found = {}
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        text = data.decode("latin-1")
        if p.suffix == ".parquet":  # values may be compressed: read them back too
            text += json.dumps(pq.read_table(p).to_pylist(), default=str)
        hits = leaks(text)
        if hits:
            found[str(p)] = hits
    return found


def errors_of(out: Path) -> list[dict]:
    return pq.read_table(out / "_job" / "errors.parquet").to_pylist()


def error_for(errors: list[dict], case: Case) -> list[dict]:
    return [e for e in errors if Path(e["manifest_file"]).name == case.file and e["manifest_row"] == case.index]


# ---------------------------------------------------------------------------------------------
# Fixtures: one hostile render, one allow-list render
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def servers():
    lo = Recorder("127.0.0.1")
    try:
        lo6 = Recorder("::1", lo.port)  # same port, so any ::1 connection would be logged
    except OSError:
        lo6 = Recorder("::1")
    lo2 = Recorder("127.0.0.2")
    yield SimpleNamespace(lo=lo, lo6=lo6, lo2=lo2)
    for s in (lo, lo6, lo2):
        s.close()


@pytest.fixture(scope="session")
def hostile(tmp_path_factory, tiny_models, ray_address, servers):
    root = tmp_path_factory.mktemp("hostile")
    inp = write_inputs(root / "inputs")
    ok_png = inp["ok.png"].read_bytes()
    for s in (servers.lo, servers.lo6, servers.lo2):
        s.routes["/ok.png"] = send_bytes(ok_png)
        s.routes["/x.png"] = send_bytes(ok_png)
    cases = hostile_cases(inp, servers.lo.port, servers.lo6.port)
    manifest = write_manifest_dir(root / "manifest", cases)
    good_manifest = write_manifest_dir(root / "good-manifest", cases, only_good=True)
    # The references live beside the manifest directory, not in it (the default root); /dev is
    # allowed so that the device row below is refused for what it is, not for where it is.
    config = write_job(root / "job.yaml", tiny_models, local_roots=[str(inp["ok.png"].parent), "/dev"])
    cwd, tmpdir = root / "cwd", root / "tmpdir"
    cwd.mkdir()
    tmpdir.mkdir()
    out = root / "out"

    base = tmp_path_factory.getbasetemp()
    before, tmp_before = tree(base), tmp_escapes()
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    conns = {n: getattr(servers, n).connections for n in ("lo", "lo6", "lo2")}
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress", env=secret_env(tmpdir), cwd=cwd, timeout=400)
    after, tmp_after = tree(base), tmp_escapes()
    return SimpleNamespace(
        root=root, base=base, inp=inp, cases=cases, manifest=manifest, good_manifest=good_manifest,
        config=config, cwd=cwd, tmpdir=tmpdir, out=out, proc=proc, store=LocalStore(out),
        changed=changed(before, after), tmp_new=tmp_after - tmp_before,
        requests={n: getattr(servers, n).since(m) for n, m in marks.items()},
        connections={n: getattr(servers, n).connections - conns[n] for n in conns},
    )


@pytest.fixture(scope="session")
def allowed(hostile, tiny_models, ray_address, servers, tmp_path_factory):
    lo, lo2 = servers.lo, servers.lo2
    root = tmp_path_factory.mktemp("allowlist")
    lo.routes.update({
        "/img.png": send_bytes(save_image(pattern((80, 64)), "PNG")),
        "/redirect-ok": redirect("/ok.png"),
        "/redirect-metadata": redirect(f"http://169.254.169.254/latest/meta-data/?X-Amz-Signature={REDIRECT_SECRET}"),
        "/redirect-lo2": redirect(f"http://127.0.0.2:{lo2.port}/x.png"),
        "/loop": redirect("/loop"),
        "/redirect-ftp": redirect(f"ftp://127.0.0.1:{lo.port}/ok.png"),
        "/big-declared": declared_big,
        "/big-stream": stream_big,
    })
    base = f"http://127.0.0.1:{lo.port}"
    sq = dict(width=64, height=64)
    rows = [
        row(id="allowed-plain", prompt="edit", references=[f"{base}/ok.png"], **sq),
        row(id="allowed-signed", prompt="edit", references=[f"{base}/img.png?{SIGNED_QUERY}"], **sq),
        row(id="allowed-redirect", prompt="edit", references=[f"{base}/redirect-ok"], **sq),
        row(id="redirect-to-metadata", prompt="x", references=[f"{base}/redirect-metadata"], **sq),
        row(id="redirect-to-other-loopback", prompt="x", references=[f"{base}/redirect-lo2"], **sq),
        row(id="redirect-loop", prompt="x", references=[f"{base}/loop"], **sq),
        # A redirect to a scheme references may not use is refused, not fetched as http.
        row(id="redirect-to-ftp", prompt="x", references=[f"{base}/redirect-ftp"], **sq),
        row(id="http-404", prompt="x", references=[f"{base}/missing.png?{SIGNED_QUERY}"], **sq),
        row(id="big-declared", prompt="x", references=[f"{base}/big-declared"], **sq),
        row(id="big-stream", prompt="x", references=[f"{base}/big-stream"], **sq),
    ]
    manifest = write_manifest(root / "allow.parquet", rows)
    config = write_job(root / "job.yaml", tiny_models, allow_private_hosts=["127.0.0.1"])
    out = root / "out"
    before = tree(root)
    marks = {n: getattr(servers, n).mark() for n in ("lo", "lo6", "lo2")}
    conns2 = lo2.connections
    proc = run_cli("render", str(manifest), "--output", str(out), "--config", str(config),
                   "--address", ray_address, "--no-progress", env=secret_env(), cwd=hostile.cwd, timeout=300)
    return SimpleNamespace(
        root=root, manifest=manifest, config=config, out=out, proc=proc, store=LocalStore(out), base=base,
        changed=changed(before, tree(root)),
        requests={n: getattr(servers, n).since(m) for n, m in marks.items()},
        lo2_connections=lo2.connections - conns2, stream_sent=lo.stream_sent,
    )


ALLOWED_GOOD = {"allowed-plain", "allowed-signed", "allowed-redirect"}
ALLOWED_BAD = {"redirect-to-metadata", "redirect-to-other-loopback", "redirect-loop", "redirect-to-ftp",
               "http-404", "big-declared", "big-stream"}

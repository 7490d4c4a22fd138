"""References are confined by default (issue #9, item 6): local ones to the manifest's directory
(or `references.local_roots`), `s3://` ones to the manifest's and the output's buckets (or
`references.s3_buckets`), and only PNG, JPEG and WebP are decoded.

A refusal is a per-row fetch error naming the setting to change, decided before the file is
opened or the bucket asked, so its message cannot tell an existing file from a missing one.
No Ray: the fetcher directly, `validate`, the driver's resolved config, and one in-process render.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import row, write_manifest
from PIL import Image
from pydantic import ValidationError

from klein_ray.assets.confinement import confine
from klein_ray.assets.references import REFERENCE_FORMATS, ReferenceError, ReferenceFetcher, decode_image
from klein_ray.commands.validate import validate_manifest
from klein_ray.config import ConfigError, JobConfig, ReferenceConfig, StorageConfig, VariantConfig
from klein_ray.executors.inprocess import InProcessExecutor
from klein_ray.intake.rows import RowValidator
from klein_ray.scheduling.driver import Driver, RenderJob

LOCAL_FIX = "add its directory to references.local_roots in the job config"


def _png(size=(64, 64)) -> bytes:
    return _encode(Image.new("RGB", size, (120, 40, 200)), "PNG")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _refused(fetcher: ReferenceFetcher, uri: str) -> str:
    with pytest.raises(ReferenceError) as caught:
        fetcher.fetch(uri)
    return str(caught.value)


@pytest.fixture
def layout(tmp_path):
    """A manifest in job/, a reference beside it, and a directory outside."""
    job, outside = tmp_path / "job", tmp_path / "outside"
    (job / "refs").mkdir(parents=True)
    outside.mkdir()
    (job / "refs" / "ok.png").write_bytes(_png())
    manifest = write_manifest(job / "m.parquet", [row(id="r", prompt="x")])
    return job, outside, manifest


def _default_fetcher(manifest: Path, output: str = "/tmp/unused-out") -> ReferenceFetcher:
    return ReferenceFetcher(confine(ReferenceConfig(), str(manifest), output), StorageConfig())


# -- local references ----------------------------------------------------------------------


def test_outside_the_roots_is_refused_alike_whether_the_file_exists_or_not(layout, monkeypatch):
    job, outside, manifest = layout
    fetcher = _default_fetcher(manifest)
    secret = outside / "secret.png"
    touched: list[str] = []
    for name in ("open", "stat", "lstat"):
        real = getattr(os, name)

        def spy(path, *args, _real=real, **kw):
            if str(outside) in os.fsdecode(path):
                touched.append(os.fsdecode(path))
            return _real(path, *args, **kw)
        monkeypatch.setattr(os, name, spy)

    missing = _refused(fetcher, str(secret))
    secret.write_bytes(_png())
    present = _refused(fetcher, str(secret))
    assert present == missing
    assert present.startswith(f"reference {secret} is outside references.local_roots (in effect: {job};")
    assert present.endswith(LOCAL_FIX)
    # Spelled as a file:// URI or through '..' out of the root, the same refusal.
    assert LOCAL_FIX in _refused(fetcher, secret.as_uri())
    assert LOCAL_FIX in _refused(fetcher, f"{job}/refs/../../outside/secret.png")
    assert touched == [], f"the filesystem was asked about a path outside the roots: {touched}"


def test_a_symlink_in_a_root_that_leads_out_is_refused(layout):
    job, outside, manifest = layout
    (outside / "secret.png").write_bytes(_png())
    (job / "refs" / "link.png").symlink_to(outside / "secret.png")
    (job / "refs" / "dangling.png").symlink_to(outside / "missing.png")
    (job / "refs" / "outdir").symlink_to(outside, target_is_directory=True)
    fetcher = _default_fetcher(manifest)
    messages = {name: _refused(fetcher, str(job / "refs" / name))
                for name in ("link.png", "dangling.png", "outdir/secret.png")}
    for name, message in messages.items():
        # The path as written; never where the link leads.
        assert message.startswith(f"reference {job / 'refs' / name} is outside references.local_roots")
        assert str(outside) not in message and "symlinks are followed" in message
        assert message.endswith(LOCAL_FIX)
    # The two links differ only in whether their target exists: so do not their messages.
    assert messages["link.png"].replace("link.png", "X") == messages["dangling.png"].replace("dangling.png", "X")


def test_a_reference_in_the_manifests_directory_is_read_by_default(layout):
    job, _, manifest = layout
    cfg = confine(ReferenceConfig(), str(manifest), "/tmp/unused-out")
    assert cfg.local_roots == [str(job)] and cfg.s3_buckets == []
    ref = ReferenceFetcher(cfg, StorageConfig()).fetch(str(job / "refs" / "ok.png"))
    assert (ref.width, ref.height) == (64, 64)
    # A directory manifest is its own root; a link inside the root to inside is fine.
    assert confine(ReferenceConfig(), str(job), None).local_roots == [str(job)]
    (job / "alias.png").symlink_to(job / "refs" / "ok.png")
    assert ReferenceFetcher(cfg, StorageConfig()).fetch((job / "alias.png").as_uri()).width == 64


def test_explicit_local_roots_replace_the_default(layout, tmp_path, monkeypatch):
    job, outside, manifest = layout
    (outside / "shared.png").write_bytes(_png((80, 64)))
    monkeypatch.chdir(tmp_path)
    cfg = confine(ReferenceConfig(local_roots=["outside"]), str(manifest), None)
    assert cfg.local_roots == [str(outside)]  # relative roots: from the driver's directory
    fetcher = ReferenceFetcher(cfg, StorageConfig())
    assert fetcher.fetch(str(outside / "shared.png")).width == 80
    assert LOCAL_FIX in _refused(fetcher, str(job / "refs" / "ok.png"))
    none = ReferenceFetcher(confine(ReferenceConfig(local_roots=[]), str(manifest), None), StorageConfig())
    assert "in effect: none" in _refused(none, str(job / "refs" / "ok.png"))
    with pytest.raises(ConfigError, match="local_roots"):
        confine(ReferenceConfig(local_roots=["~no-such-user-kr/x"]), str(manifest), None)


def test_an_s3_manifest_allows_no_local_reference_by_default(layout):
    job, _, _ = layout
    cfg = confine(ReferenceConfig(), "s3://catalog/manifests/", str(job / "out"))
    assert cfg.local_roots == [] and cfg.s3_buckets == ["catalog"]
    message = _refused(ReferenceFetcher(cfg, StorageConfig()), str(job / "refs" / "ok.png"))
    assert "in effect: none" in message and LOCAL_FIX in message


def test_an_unconfined_fetcher_reads_nothing_local_or_s3(layout):
    """A ReferenceConfig that `confine` never saw fails closed."""
    job, _, _ = layout
    fetcher = ReferenceFetcher(ReferenceConfig(), StorageConfig())
    assert LOCAL_FIX in _refused(fetcher, str(job / "refs" / "ok.png"))
    assert "references.s3_buckets" in _refused(fetcher, "s3://any/ref.png")


def test_the_settings_take_bucket_names_and_local_directories():
    assert ReferenceConfig(s3_buckets=["s3://cat/", "renders"]).s3_buckets == ["cat", "renders"]
    for bad in ({"s3_buckets": ["cat/refs"]}, {"s3_buckets": [""]}, {"local_roots": ["https://x/y"]},
                {"local_roots": [" "]}):
        with pytest.raises(ValidationError):
            ReferenceConfig(**bad)


# -- s3 references -------------------------------------------------------------------------


def test_s3_references_are_confined_to_the_manifests_and_outputs_buckets(moto_s3, s3_env):
    s3_env(moto_s3)
    client = moto_s3.client()
    names = {k: f"t-{k}-{uuid.uuid4().hex[:8]}" for k in ("manifest", "output", "other")}
    for name in names.values():
        client.create_bucket(Bucket=name)
        client.put_object(Bucket=name, Key="refs/r.png", Body=_png())
    uri = {k: f"s3://{name}/refs/r.png" for k, name in names.items()}
    default = confine(ReferenceConfig(), f"s3://{names['manifest']}/m/", f"s3://{names['output']}/out")
    assert default.s3_buckets == [names["manifest"], names["output"]]
    fetcher = ReferenceFetcher(default, StorageConfig())
    assert fetcher.fetch(uri["manifest"]).width == fetcher.fetch(uri["output"]).width == 64
    refused = _refused(fetcher, uri["other"])
    assert f"add {names['other']!r} to references.s3_buckets in the job config" in refused
    # Decided before any request: a bucket that does not exist reads the same.
    ghost = _refused(fetcher, "s3://t-ghost-bucket/refs/r.png")
    assert ghost.replace("t-ghost-bucket", "B") == refused.replace(names["other"], "B")

    listed = confine(ReferenceConfig(s3_buckets=[f"s3://{names['other']}/"]), f"s3://{names['manifest']}/m/", None)
    assert listed.s3_buckets == [names["other"]]  # the list replaces the default
    fetcher = ReferenceFetcher(listed, StorageConfig())
    assert fetcher.fetch(uri["other"]).width == 64
    assert "references.s3_buckets" in _refused(fetcher, uri["manifest"])


@pytest.mark.subprocess
def test_validate_given_the_output_allows_its_bucket_as_render_does(tmp_path, moto_s3, s3_env):
    from helpers import run_cli

    server = s3_env(moto_s3)
    names = {k: server.new_bucket() for k in ("output", "other")}
    manifest = write_manifest(tmp_path / "m.parquet", [
        row(id=k, prompt="x", references=[f"s3://{name}/refs/r.png"]) for k, name in names.items()])
    args = ("validate", str(manifest))
    without = run_cli(*args, env=server.env())
    assert without.returncode == 2 and "id=output" in without.stdout and "id=other" in without.stdout
    given = run_cli(*args, "--output", f"s3://{names['output']}/renders", env=server.env())
    assert given.returncode == 2, given.stderr[-2000:]
    assert "id=output" not in given.stdout and "id=other" in given.stdout
    assert list(server.client().list_objects_v2(Bucket=names["output"]).get("Contents", [])) == []  # nothing written


# -- formats -------------------------------------------------------------------------------

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
%%EOF
"""


def _unaccepted() -> dict[str, bytes]:
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    return {"EPS": EPS, "GIF": _encode(img, "GIF"), "BMP": _encode(img, "BMP"),
            "TIFF": _encode(img, "TIFF"), "PPM": _encode(img, "PPM")}


@pytest.mark.parametrize("fmt", ["EPS", "GIF", "BMP", "TIFF", "PPM"])
def test_an_unaccepted_format_is_refused_without_reaching_its_decoder(fmt, monkeypatch):
    data = _unaccepted()[fmt]
    assert Image.open(io.BytesIO(data)).format == fmt  # the fixture is what it claims to be
    Image.init()
    reached: list[str] = []
    for name, (factory, accept) in list(Image.OPEN.items()):
        if name not in REFERENCE_FORMATS:
            def spy_accept(prefix, _name=name):
                reached.append(_name)
                return False
            monkeypatch.setitem(Image.OPEN, name, (factory, spy_accept))
    with pytest.raises(ReferenceError) as caught:
        decode_image(data, "refs/x.img")
    message = str(caught.value)
    assert "not a readable image in an accepted format (PNG, JPEG, WEBP)" in message
    assert reached == [], f"Pillow asked other plugins: {reached}"


@pytest.mark.parametrize("fmt", REFERENCE_FORMATS)
def test_the_accepted_formats_decode(fmt):
    img = decode_image(_encode(Image.new("RGB", (64, 48), (1, 2, 3)), fmt), f"x.{fmt}")
    assert (img.mode, img.size) == ("RGB", (64, 48))


def test_an_eps_reference_in_a_root_is_a_fetch_error_naming_the_formats(layout):
    job, _, manifest = layout
    (job / "refs" / "drawing.eps").write_bytes(EPS)
    message = _refused(_default_fetcher(manifest), str(job / "refs" / "drawing.eps"))
    assert "accepted format (PNG, JPEG, WEBP)" in message


# -- where the defaults are resolved: validate and the driver ------------------------------


def test_validate_names_a_reference_outside_the_roots_with_or_without_fetching(layout, monkeypatch):
    job, outside, _ = layout
    manifest = write_manifest(job / "v.parquet", [
        row(id="inside", prompt="x", references=["refs/ok.png"]),
        row(id="outside", prompt="x", references=[str(outside / "nope.png")]),
    ])
    monkeypatch.chdir(job)  # relative references are taken from the working directory
    for check in (False, True):
        problems = validate_manifest(str(manifest), JobConfig(), check_references=check)
        assert [(p.id, p.stage, p.column) for p in problems] == [("outside", "fetch", "references")]
        assert problems[0].message.endswith(LOCAL_FIX)


def test_a_refusal_quotes_the_path_as_written_not_a_links_target(layout):
    _, outside, manifest = layout
    (outside / "target-secret.png").write_bytes(_png())
    (outside / "innocent.png").symlink_to(outside / "target-secret.png")
    spec = RowValidator(JobConfig(), base_dir=outside).validate(
        row(id="r", prompt="x", references=["innocent.png"]), "m.parquet", 0)
    assert spec.references == ((outside / "innocent.png").as_uri(),)
    message = _refused(_default_fetcher(manifest), spec.references[0])
    assert "innocent.png" in message and "target-secret" not in message


@pytest.mark.subprocess
def test_the_driver_resolves_the_defaults_before_workers_start(layout):
    job, _, manifest = layout
    config = JobConfig(variants={"v": VariantConfig(source="org/model")}, default_variant="v")
    driver = Driver(RenderJob(str(manifest), str(job / "out"), config), InProcessExecutor)
    assert driver.cfg.references.local_roots == [str(job)]
    assert driver.cfg.references.s3_buckets == []
    assert config.references.local_roots is None  # the job's own config is left as given


def test_a_render_fails_only_the_rows_whose_references_lie_outside(layout, tiny_models):
    job, outside, manifest = layout
    (outside / "elsewhere.png").write_bytes(_png())
    rows = [row(id="in", prompt="edit", references=[str(job / "refs" / "ok.png")], width=64, height=64),
            row(id="out", prompt="edit", references=[str(outside / "elsewhere.png")], width=64, height=64)]
    manifest = write_manifest(job / "render.parquet", rows)
    config = JobConfig(variants={"tiny": VariantConfig(source=str(tiny_models["tiny"]), pipeline="distilled")},
                       default_variant="tiny")
    summary, code = Driver(RenderJob(str(manifest), str(job / "out"), config), InProcessExecutor).run()
    assert (summary["committed"], summary["failed"], code) == (1, 1, 1)
    (error,) = pq.read_table(job / "out" / "_job" / "errors.parquet").to_pylist()
    assert (error["id"], error["stage"], error["error_type"]) == ("out", "fetch", "ReferenceError")
    assert LOCAL_FIX in error["message"]

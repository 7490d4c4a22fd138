"""Where references may be read from: the local directories and S3 buckets a job confines them to.

This module owns the policy, not the reading: ``confine`` turns ``references.local_roots`` and
``references.s3_buckets`` into explicit lists (the defaults depend on where the manifest and the
output are, which only the driver knows: it calls ``confine`` once, before any worker starts),
and ``local_target`` / ``check_bucket`` decide, before anything is opened or requested, whether
one reference may be read. A refusal's message names the setting to change and is built from the
reference as written and the config alone, so it reads the same whether the file exists or not.
"""

from __future__ import annotations

import os
from pathlib import Path

from klein_ray.config import ConfigError, ReferenceConfig
from klein_ray.uris import FILE, S3, is_s3, kind_of, local_path, split_s3

LOCAL_DEFAULT = "the default is the manifest's directory, none for a manifest in S3"
S3_DEFAULT = "the default is the manifest's and the output's buckets, those in S3"


class Refused(ValueError):
    """A reference outside the job's confinement; the message is safe to record."""


def confine(cfg: ReferenceConfig, manifest_uri: str, output_uri: str | None = None) -> ReferenceConfig:
    """A copy of ``cfg`` whose ``local_roots`` and ``s3_buckets`` are explicit lists: unset ones
    get their defaults, given roots become absolute (relative ones are taken from this process's
    working directory, as relative reference paths are). Raises ConfigError for a root that
    cannot be made absolute."""
    roots = cfg.local_roots
    if roots is None:
        roots = [] if is_s3(manifest_uri) else _manifest_dir(manifest_uri)
    else:
        roots = [_absolute(root) for root in roots]
    buckets = cfg.s3_buckets
    if buckets is None:
        buckets = []
        for uri in (manifest_uri, output_uri):
            bucket = _bucket_of(uri)
            if bucket and bucket not in buckets:
                buckets.append(bucket)
    return cfg.model_copy(update={"local_roots": roots, "s3_buckets": buckets})


def local_target(uri: str, roots: list[str] | None) -> Path:
    """The real path (symlinks followed) to open for the local reference ``uri``, or Refused when
    it is not under one of ``roots`` (None, a config ``confine`` never saw, allows none).

    The path is first normalised and checked as written, touching nothing, so a path outside
    every root is refused before the filesystem is asked anything about it; only a path inside
    one is resolved, to catch a symlink that leads out."""
    path = Path(os.path.normpath(local_path(uri)))
    bounds = [_bounds(root) for root in roots or ()]
    if any(path.is_relative_to(written) or path.is_relative_to(real) for written, real in bounds):
        real_path = Path(os.path.realpath(path))
        if any(real_path.is_relative_to(real) for _, real in bounds):
            return real_path
    shown = ", ".join(roots or ()) or "none"
    raise Refused(f"reference {uri} is outside references.local_roots (in effect: {shown}; "
                  f"{LOCAL_DEFAULT}; symlinks are followed; relative paths in a manifest are taken "
                  "from its directory): if this file is meant to be read, add its directory to "
                  "references.local_roots in the job config")


def check_bucket(uri: str, buckets: list[str] | None) -> None:
    """Refused unless the ``s3://`` reference ``uri`` is in one of ``buckets`` (None: none)."""
    bucket, _ = split_s3(uri)
    if bucket not in (buckets or ()):
        shown = ", ".join(buckets or ()) or "none"
        raise Refused(f"reference {uri} is in bucket {bucket!r}, outside references.s3_buckets "
                      f"(in effect: {shown}; {S3_DEFAULT}); add {bucket!r} to "
                      "references.s3_buckets in the job config")


def refusal(uri: str, cfg: ReferenceConfig) -> str | None:
    """Why ``uri`` may not be read under ``cfg``'s confinement, or None (http(s) references are
    confined by address when fetched, not here). Reads nothing, so `validate` can ask for every
    reference; a malformed URI is left to the fetch, which reports it."""
    try:
        kind = kind_of(uri)
        if kind == S3:
            check_bucket(uri, cfg.s3_buckets)
        elif kind == FILE:
            local_target(uri, cfg.local_roots)
    except Refused as exc:
        return str(exc)
    except (ValueError, RuntimeError):
        return None
    return None


def _bounds(root: str) -> tuple[Path, Path]:
    # A root is matched as written and as resolved: "/data" may be a link to "/mnt/data", and a
    # reference may be written either way.
    written = Path(os.path.normpath(local_path(root)))
    return written, Path(os.path.realpath(written))


def _manifest_dir(manifest_uri: str) -> list[str]:
    try:
        path = Path(os.path.normpath(local_path(manifest_uri)))
    except ValueError:  # not a usable local URI: opening the manifest reports it
        return []
    # A directory manifest is its own directory; a file's is the one it is in.
    return [str(path if path.is_dir() else path.parent)]


def _absolute(root: str) -> str:
    try:
        return os.path.normpath(local_path(root))
    except (ValueError, RuntimeError) as exc:  # RuntimeError: "~user" with no such user
        raise ConfigError(f"references.local_roots: {root!r}: {exc}") from None


def _bucket_of(uri: str | None) -> str | None:
    if not uri or not is_s3(uri):
        return None
    try:
        return split_s3(uri)[0]
    except ValueError:  # "s3://" without a bucket: opening it reports that
        return None

"""URIs: the one place that knows the schemes klein-ray reads and writes, and what each means.

| written as | kind | means |
|---|---|---|
| ``s3://bucket/key`` | ``s3`` | an object or prefix on S3 or an S3-compatible server |
| ``file:///abs``, ``/abs``, ``rel``, ``~/p`` | ``file`` | a local path (relative ones: to a base the caller names) |
| ``http://…``, ``https://…`` | ``http`` | a web resource (references only) |
| ``hf://org/repo[@rev]/file`` | ``hf`` | a file of a Hugging Face Hub repo (single-file transformers only) |

Every caller (manifests, outputs, references and their confinement, model sources, config
fields) asks ``parse`` which kind a string is, naming the kinds it accepts; a string of another
kind is a ``UriError`` that lists the accepted ones. Imports nothing of klein_ray.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

S3, FILE, HTTP, HF = "s3", "file", "http", "hf"
KINDS = (S3, FILE, HTTP, HF)
_PREFIXES = {"s3://": S3, "http://": HTTP, "https://": HTTP, "file://": FILE, "hf://": HF}
_SHOWN = {S3: "s3://", HTTP: "http(s)://", HF: "hf://"}


class UriError(ValueError):
    """A string that is not a URI of an accepted kind; the message says which are."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: its kind and the parts that kind has."""

    kind: str
    uri: str  # canonical: s3://bucket/key, file:///abs/path, the http(s) or hf URI as given
    bucket: str = ""  # s3
    key: str = ""  # s3: the key or prefix, no leading or trailing slash
    path: Path | None = None  # file: absolute, lexically normalised ('..' folded, links kept)


def kind_of(uri: str) -> str | None:
    """The kind a string's scheme names, ``file`` for a plain path, None for an unknown scheme."""
    for prefix, kind in _PREFIXES.items():
        if uri.startswith(prefix):
            return kind
    return None if "://" in uri else FILE


def parse(uri: str, accept: tuple[str, ...] = KINDS, base: Path | None = None,
          what: str = "URI") -> Location:
    """``uri`` as a ``Location`` of one of the ``accept`` kinds. A relative path is taken from
    ``base`` (default: this process's working directory). Raises UriError, whose message names
    ``what`` was given and the accepted forms, never the URI itself (it may carry secrets)."""
    kind = kind_of(uri)
    if kind is None or kind not in accept:
        found = f"scheme {uri.split('://', 1)[0]!r}" if "://" in uri else "a local path"
        raise UriError(f"unsupported {what} {found} (use {_forms(accept)})")
    if kind == S3:
        bucket, key = split_s3(uri)
        return Location(S3, f"s3://{bucket}/{key}".rstrip("/"), bucket=bucket, key=key)
    if kind == FILE:
        path = local_path(uri, base)
        return Location(FILE, path.as_uri(), path=path)
    return Location(kind, uri)


def _forms(accept: tuple[str, ...]) -> str:
    """The accepted forms in words: "s3://, http(s)://, file:// or a path"."""
    forms: list[str] = []
    for kind in accept:
        if kind == FILE:  # "a path" last when it ends the list, first otherwise: reads either way
            forms += ["file://", "a path"] if kind == accept[-1] else ["a path", "file://"]
        else:
            forms.append(_SHOWN[kind])
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0]


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``) with no leading or trailing slash."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UriError(f"not an s3:// URI with a bucket: {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def local_path(uri: str, base: Path | None = None) -> Path:
    """A local path or ``file://`` URI as an absolute, lexically normalised path (symlinks are
    not followed: whoever opens it decides that). Relative paths are taken from ``base``."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise UriError(f"file:// URI with a remote host is not supported: {uri!r}")
        path = Path(unquote(parsed.path))
    else:
        try:
            path = Path(uri).expanduser()
        except RuntimeError:  # "~user" with no such user
            raise UriError(f"cannot expand the home directory in {uri!r}") from None
    if not path.is_absolute():
        path = (base or Path.cwd()).absolute() / path
    return Path(os.path.normpath(path))


def redact(uri: str) -> str:
    """Drop credentials and query strings (signed URLs carry their signature there)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets, or the port would read as part of it
        host = f"[{host}]"
    try:
        port: int | str | None = parts.port
    except ValueError:  # a port that is not a number: keep whatever was written after the host
        port = parts.netloc.rsplit("@", 1)[-1].rsplit("]", 1)[-1].partition(":")[2] or None
    if port:
        host = f"{host}:{port}"
    query = "REDACTED" if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


# What ``scrub`` removes from text: every URL (its query and userinfo, through ``redact``), a
# query string quoted without its URL (as http.client's InvalidURL quotes a path), and the
# values of the parameters signed URLs and tokens carry.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()]+")
_QUERY = re.compile(r"\?[^\s'\"<>()?]*=[^\s'\"<>()]*")
_USERINFO = re.compile(r"//[^/\s@'\"<>]+@")
_SECRET_PARAM = re.compile(
    r"(?i)\b(x-amz-[a-z-]+|signature|sig|token|access_token|password|passwd|secret|key|credential|policy)"
    r"=[^\s&'\"<>]+")


def scrub(text: str) -> str:
    """``text`` fit to record or log: no query string, userinfo or credential of any URL in it,
    redirect targets and URLs quoted in library errors included. Applied wherever an error
    message is recorded or logged (``RowError``, the logs, the summary)."""
    text = _URL.sub(lambda m: redact(m.group(0)) if "?" in m.group(0) or "@" in m.group(0) else m.group(0), text)
    text = _USERINFO.sub("//", text)
    text = _QUERY.sub("?REDACTED", text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=REDACTED", text)

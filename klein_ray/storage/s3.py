"""The S3 implementation of ``Store`` (boto3), for AWS and S3-compatible servers.

boto3 runs with ``standard`` retries and checksums only when required (S3-compatible servers
reject or ignore the CRC32 headers newer boto3 sends); clients are shared per process. Error
translation lives here so that callers only ever see ``NotFound``, ``AlreadyExists``,
``TooLarge`` or ``StorageError``; botocore's messages never carry credentials, but we still
build our own messages from the operation and key rather than echoing request details.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from klein_ray.config import StorageConfig
from klein_ray.storage.base import (
    AlreadyExists,
    Misconfigured,
    NotFound,
    ObjectInfo,
    StorageError,
    StorageUnavailable,
    Store,
    TooLarge,
    VersionChanged,
    Versioned,
    check_key,
)
from klein_ray.uris import split_s3

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024
MULTIPART_BYTES = 64 * 1024 * 1024  # put_file: files past this go up in parts of this size
T = TypeVar("T")
# Worth another try after botocore gave up: throttling, server errors, a conflicting
# conditional write, and every connection-level failure (resets, timeouts).
TRANSIENT_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "ConditionalRequestConflict", "500", "502", "503", "504", "409",
}


_clients: dict[tuple, object] = {}
_answered: set[str] = set()  # endpoints that answered at least once in this process


@dataclass(frozen=True)
class Endpoint:
    """Where S3 requests go, and which setting chose it (for messages)."""

    url: str
    chosen_by: str

    def never_answered(self, exc: Exception) -> str:
        return (f"the S3 endpoint {self.url} never answered ({_describe(exc)}); it was chosen by "
                f"{self.chosen_by}. Check storage.endpoint_url in the job config (or "
                "AWS_ENDPOINT_URL_S3) and the network; if it is right and merely down, run again "
                "once it answers")


def endpoint_of(cfg: StorageConfig) -> Endpoint:
    if cfg.endpoint_url:
        return Endpoint(cfg.endpoint_url, "storage.endpoint_url in the job config")
    env = os.environ.get("AWS_ENDPOINT_URL_S3")
    if env:
        return Endpoint(env, "the AWS_ENDPOINT_URL_S3 environment variable")
    region = cfg.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return Endpoint(f"AWS S3 ({region})", "default: neither storage.endpoint_url nor AWS_ENDPOINT_URL_S3 "
                    "is set, so requests go to AWS itself")
_clients_lock = threading.Lock()


def s3_client(cfg: StorageConfig):
    """A boto3 S3 client for ``cfg``, shared per process (clients are thread-safe)."""
    endpoint = cfg.resolved_endpoint()
    key = (endpoint, cfg.region, cfg.max_attempts, cfg.connect_timeout, cfg.read_timeout)
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
                connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Custom endpoints are rarely set up for virtual-hosted buckets.
                s3={"addressing_style": "path" if endpoint else "auto"},
                max_pool_connections=32,
            )
            session = boto3.session.Session()
            _clients[key] = session.client(
                "s3", endpoint_url=endpoint, region_name=cfg.region or None, config=config
            )
        return _clients[key]


def reset_clients() -> None:
    """Forget the shared clients: the next store builds new ones from the current environment
    (credentials or endpoint changed, or a long-lived client's retry budget should start full)."""
    with _clients_lock:
        _clients.clear()


class S3Store(Store):
    def __init__(self, uri: str, cfg: StorageConfig):
        self.bucket, self.prefix = split_s3(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(cfg)
        self.retry_seconds = cfg.outer_retry_seconds
        self.endpoint = endpoint_of(cfg)

    def _retrying(self, fn: Callable[[], T]) -> T:
        """botocore's retries, plus ours with backoff: its retry budget runs dry in a long outage.
        The first failure is logged at once with what is retried and for how long; an endpoint
        that never answered at all in this process (no connection was ever made: a wrong or
        missing endpoint, no route) is a configuration problem, not an outage: ``Misconfigured``
        after botocore's own retries, naming the endpoint and the settings that chose it."""
        deadline = time.monotonic() + self.retry_seconds
        delay, told = 0.5, False
        while True:
            try:
                result = fn()
                _answered.add(self.endpoint.url)
                return result
            except Exception as exc:
                if _connected(exc):
                    _answered.add(self.endpoint.url)
                elif _unreachable_endpoint(exc) and self.endpoint.url not in _answered:
                    raise Misconfigured(self.endpoint.never_answered(exc)) from exc
                if not _transient(exc) or time.monotonic() + delay > deadline:
                    raise
                if not told:
                    told = True
                    log.warning("storage: %s did not answer (%s); retrying for up to %.0f s",
                                self.endpoint.url, _describe(exc), max(0.0, deadline - time.monotonic()))
            time.sleep(random.uniform(0, delay))  # full jitter, like botocore
            delay = min(delay * 2, 20.0)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key, data, *, content_type=None, metadata=None, if_absent=False, if_match=None):
        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        if metadata:
            kwargs["Metadata"] = metadata
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match  # bare: Ceph RGW refuses the quoted form (S3 notes)
        try:
            resp = self._retrying(lambda: self.client.put_object(**kwargs))
        except Exception as exc:
            code = _code(exc)
            if code in ("PreconditionFailed", "412") and if_absent:
                raise AlreadyExists(key) from None
            if code in ("PreconditionFailed", "412", "NoSuchKey", "404") and if_match is not None:
                raise VersionChanged(f"{key}: not at version {if_match}") from None
            raise _failure(exc)(f"put {self.url_of(key)}: {_describe(exc)}") from exc
        return _etag(resp)

    def get(self, key, max_bytes=None):
        return self.get_versioned(key, max_bytes).data

    def get_versioned(self, key, max_bytes=None):
        self._key(key)  # unsafe keys are the caller's bug: ValueError, not a storage error
        try:
            return self._retrying(lambda: self._get_once(key, max_bytes))
        except (NotFound, TooLarge):
            raise
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(key) from None
            raise _failure(exc)(f"get {self.url_of(key)}: {_describe(exc)}") from exc

    def get_range(self, key, start, length):
        if length <= 0:
            return b""
        full = self._key(key)

        def once() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + length - 1}")
            try:
                return resp["Body"].read()
            finally:
                resp["Body"].close()
        try:
            return self._retrying(once)
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(key) from None
            if _code(exc) in ("InvalidRange", "416"):
                return b""  # past the end
            raise _failure(exc)(f"get {self.url_of(key)}: {_describe(exc)}") from exc

    def _get_once(self, key: str, max_bytes: int | None) -> Versioned:
        resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        body = resp["Body"]
        try:
            if max_bytes is not None and resp.get("ContentLength", 0) > max_bytes:
                raise TooLarge(f"{key}: {resp['ContentLength']} bytes, limit {max_bytes}")
            chunks, total = [], 0
            while chunk := body.read(_CHUNK):
                total += len(chunk)
                # Enforced while reading too: Content-Length can lie or be absent.
                if max_bytes is not None and total > max_bytes:
                    raise TooLarge(f"{key}: larger than {max_bytes} bytes")
                chunks.append(chunk)
            return Versioned(b"".join(chunks), _etag(resp))
        finally:
            body.close()

    def head(self, key):
        full = self._key(key)
        try:
            resp = self._retrying(lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _failure(exc)(f"head {self.url_of(key)}: {_describe(exc)}") from exc
        return ObjectInfo(key, resp["ContentLength"], dict(resp.get("Metadata") or {}), _etag(resp))

    def list(self, prefix=""):
        rel = prefix.strip("/")
        if rel:
            check_key(rel)
        full = "/".join(x for x in (self.prefix, rel) if x)
        if full and (prefix.endswith("/") or not rel):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        kwargs = {"Bucket": self.bucket, "Prefix": full}
        while True:
            try:
                page = self._retrying(lambda: self.client.list_objects_v2(**kwargs))
            except Exception as exc:
                raise _failure(exc)(f"list {self.uri}/{prefix}: {_describe(exc)}") from exc
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], obj["Size"])
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, key, if_match=None):
        kwargs = {"Bucket": self.bucket, "Key": self._key(key)}
        if if_match is not None:
            kwargs["IfMatch"] = if_match  # honoured by AWS and moto, ignored by Ceph RGW
        try:
            self._retrying(lambda: self.client.delete_object(**kwargs))
        except Exception as exc:
            if if_match is not None and _code(exc) in ("PreconditionFailed", "412"):
                raise VersionChanged(f"{key}: not at version {if_match}") from None
            if if_match is not None and _code(exc) in ("NoSuchKey", "404"):
                return  # gone already
            raise _failure(exc)(f"delete {self.url_of(key)}: {_describe(exc)}") from exc

    def put_file(self, key, path, *, content_type=None):
        """s3transfer: one PUT for a small file, a multipart upload (parts in parallel) past
        ``MULTIPART_BYTES``; S3 makes the object visible only once complete, either way."""
        from boto3.s3.transfer import TransferConfig

        full = self._key(key)
        extra = {"ContentType": content_type} if content_type else None
        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

        def upload() -> None:
            try:
                self.client.upload_file(str(path), self.bucket, full, ExtraArgs=extra, Config=config)
            except Exception as exc:  # noqa: BLE001 - s3transfer wraps botocore's errors: unwrap any
                raise _cause(exc) from None  # the botocore error, which the retries classify

        try:
            self._retrying(upload)
        except Exception as exc:
            raise _failure(exc)(f"put {self.url_of(key)}: {_describe(exc)}") from exc

    def download(self, key, dest):
        full = self._key(key)
        # s3transfer: ranged GETs in parallel for large objects (model weights are GBs).
        try:
            self._retrying(lambda: self.client.download_file(self.bucket, full, str(dest)))
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(key) from None
            raise StorageError(f"download {self.url_of(key)}: {_describe(exc)}") from exc


def _etag(resp: dict) -> str:
    """The response's ETag without the quotes S3 puts around it (RGW wants it bare in IfMatch)."""
    return str(resp.get("ETag", "")).strip('"')


def _cause(exc: Exception) -> Exception:
    """The botocore error inside s3transfer's wrapper (``S3UploadFailedError`` carries none as
    a type: its ``__cause__`` or context is the ClientError)."""
    inner = exc.__cause__ or exc.__context__
    return inner if isinstance(inner, Exception) and not getattr(exc, "response", None) else exc


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error", {})
    code = str(err.get("Code", ""))
    if not code:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _describe(exc: Exception) -> str:
    code = _code(exc)
    response = getattr(exc, "response", None) or {}
    message = response.get("Error", {}).get("Message", "")
    if code:
        return f"{code} {message}".strip()
    return f"{type(exc).__name__}: {exc}"


# What outlasting every retry means the server is unreachable, as opposed to a conflict or a
# clock problem: the caller can try again later (a driver stops with exit 75).
UNREACHABLE_CODES = TRANSIENT_CODES - {"ConditionalRequestConflict", "409", "RequestTimeTooSkewed"}


def _failure(exc: Exception) -> type[StorageError]:
    """The error to raise for ``exc`` once retries are spent: StorageUnavailable when the server
    could not be reached or would not serve, StorageError for everything else (403, bad key)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        unreachable = _code(exc) in UNREACHABLE_CODES
    else:  # resets, timeouts, refused connections; not e.g. NoCredentialsError
        unreachable = isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))
    return StorageUnavailable if unreachable else StorageError


def _connected(exc: Exception) -> bool:
    """The server answered (an HTTP error), or at least accepted a connection (then reset it,
    or was slow to answer): something is there."""
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    return isinstance(exc, (ClientError, ConnectionClosedError, ReadTimeoutError))


def _unreachable_endpoint(exc: Exception) -> bool:
    """No connection could be made at all: the name does not resolve, nothing listens, no
    route, or the connection timed out."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))


def _transient(exc: Exception) -> bool:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        return _code(exc) in TRANSIENT_CODES
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return False  # retrying cannot fix these: say so now, not after outer_retry_seconds
    # Connection resets, read/connect timeouts, closed connections, truncated bodies.
    return isinstance(exc, (BotoCoreError, ConnectionError, TimeoutError))

"""Blocks in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, R2, ...), read through a local disk cache.

``KVRAG_BLOB_URL=s3://BUCKET/PREFIX`` picks it; the endpoint and credentials come from the AWS SDKs' standard
variables (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``). One object per blob, at
``PREFIX/<namespace>/<sha256 hex>``, written with its SHA-256 in ``x-amz-checksum-sha256`` so the store itself
refuses bytes damaged on the way; a put returns only after the store acknowledged it. Every fetched object is
checked against its length and its name before it is returned or cached.

The client is obstore (Rust's object_store crate): measured against boto3 on SeaweedFS (bench/s3_clients.py,
docs/SCALING.md) it is ~2x faster on gets and ~1.5x on puts of 100-400 KB blocks, and carries no botocore.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from kvstore.errors import CorruptBlock, StorageUnavailable, ValidationFailed
from kvstore.storage.blobcache import BlobCache
from kvstore.storage.local import blob_id_of

if TYPE_CHECKING:  # obstore's config TypedDicts exist only in its stubs
    from obstore.store import ClientConfig, RetryConfig, S3Config

log = logging.getLogger(__name__)
_BLOB_ID = re.compile(r"[0-9a-f]{64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,200}")
# Object stores keep whole seconds of LastModified: a blob may be up to this much newer than it says.
_MTIME_RESOLUTION_S = 1.0
# A store that went away must answer 503 soon, not after object_store's default 3 minutes of retries.
_RETRY: RetryConfig = {"max_retries": 2, "retry_timeout": timedelta(seconds=10),
                       "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                                   "base": 2.0}}
_CONNECT_TIMEOUT, _REQUEST_TIMEOUT = timedelta(seconds=3), timedelta(seconds=60)
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_Errors = (BaseError, OSError)  # obstore raises its own classes and builtins (FileNotFoundError, ConnectionError)


@dataclass(frozen=True)
class S3Location:
    """``s3://BUCKET/PREFIX``: the bucket and the key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or parts.query or parts.fragment or parts.username or parts.port:
            raise ValidationFailed(f"blob URL must be s3://BUCKET/PREFIX, got {url!r}")
        if not _BUCKET.fullmatch(parts.hostname or "") or ".." in (parts.hostname or ""):
            raise ValidationFailed(f"blob URL {url!r}: {parts.hostname!r} is not a valid S3 bucket name")
        segments = [s for s in parts.path.split("/") if s]
        if any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
            raise ValidationFailed(f"blob URL {url!r}: the prefix may hold only letters, digits and . _ - /")
        return cls(bucket=parts.hostname or "", prefix="/".join(segments))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class S3Endpoint:
    """Where and as whom to connect, from the AWS SDKs' variables; ``url`` None = AWS itself (HTTPS)."""

    url: str | None
    region: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    allow_http: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, allow_http: bool = False) -> S3Endpoint:
        """Plain HTTP is accepted for a loopback endpoint; elsewhere only with ``allow_http`` (credentials and
        blocks would cross the network in clear)."""
        url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        http = False
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValidationFailed(f"AWS_ENDPOINT_URL must be an http(s) URL, got {url!r}")
            if parts.username or parts.password:  # it is printed in errors and logs: keep secrets out of it
                raise ValidationFailed("AWS_ENDPOINT_URL must not hold credentials: set AWS_ACCESS_KEY_ID and "
                                       "AWS_SECRET_ACCESS_KEY")
            http = parts.scheme == "http"
            if http and not allow_http and not _is_loopback(parts.hostname):
                raise ValidationFailed(f"AWS_ENDPOINT_URL {url} is plain HTTP off loopback: use https, or set "
                                       "KVRAG_BLOB_ALLOW_HTTP=true to accept it")
        return cls(url=url, region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                   secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                   session_token=env.get("AWS_SESSION_TOKEN") or None, allow_http=http)

    def __str__(self) -> str:
        return self.url or f"AWS S3 ({self.region})"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _reason(exc: BaseException) -> tuple[str | None, int | None, str]:
    """(S3 error code, HTTP status, one short line) from an obstore error, whose text is multi-line."""
    text = str(exc)
    code = re.search(r"<Code>([^<]{1,64})</Code>", text)
    status = re.search(r"status code: (\d{3})", text)
    line = re.sub(r"\s+", " ", text.split("\n", 1)[0]).strip()[:240] or type(exc).__name__
    return (code.group(1) if code else None), (int(status.group(1)) if status else None), line


class S3BlobStore:
    """The :class:`~kvstore.storage.blobstore.BlobStore` contract on an S3-compatible bucket.

    ``fetches`` counts object reads (cache misses that went to the store).
    """

    def __init__(self, location: S3Location, endpoint: S3Endpoint, *, namespace: str = "blobs",
                 cache: BlobCache | None = None) -> None:
        if not _SEGMENT.fullmatch(namespace) or namespace in (".", ".."):
            raise ValidationFailed(f"blob namespace {namespace!r} is not a plain name")
        self.location, self.endpoint, self.namespace, self.cache = location, endpoint, namespace, cache
        self.fetches = 0
        config: S3Config = {"region": endpoint.region, "checksum_algorithm": "sha256"}
        if endpoint.url:
            config["endpoint"] = endpoint.url
        if endpoint.access_key_id and endpoint.secret_access_key:
            config["access_key_id"] = endpoint.access_key_id
            config["secret_access_key"] = endpoint.secret_access_key
            if endpoint.session_token:
                config["session_token"] = endpoint.session_token
        client: ClientConfig = {"connect_timeout": _CONNECT_TIMEOUT, "timeout": _REQUEST_TIMEOUT,
                                "allow_http": endpoint.allow_http}
        try:
            self._store = S3Store(location.bucket, prefix=location.prefix or None, config=config,
                                  client_options=client, retry_config=_RETRY)
        except _Errors as exc:
            raise StorageUnavailable(f"object store {location} at {endpoint}: {_reason(exc)[2]}") from None
        self._check()

    @classmethod
    def from_url(cls, url: str, *, namespace: str, cache_dir: Path | None, cache_bytes: int, allow_http: bool,
                 env: Mapping[str, str]) -> S3BlobStore:
        location, endpoint = S3Location.parse(url), S3Endpoint.from_env(env, allow_http=allow_http)
        cache = BlobCache(cache_dir, cache_bytes) if cache_dir is not None and cache_bytes > 0 else None
        return cls(location, endpoint, namespace=namespace, cache=cache)

    def __repr__(self) -> str:
        return f"S3BlobStore({self.location}/{self.namespace} at {self.endpoint})"

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: object reads, and the cache's hits, misses, dropped files and bytes."""
        c = self.cache
        return {"fetches": self.fetches, "cache_hits": c.hits if c else 0, "cache_misses": c.misses if c else 0,
                "cache_corrupt": c.corrupt if c else 0, "cache_bytes": c.nbytes if c else 0}

    def _check(self) -> None:
        """One list request: a missing bucket, refused credentials or a dead endpoint fail here, in one line."""
        try:
            next(iter(obstore.list(self._store, prefix=self.namespace, chunk_size=1)), None)
        except _Errors as exc:
            code, status, line = _reason(exc)
            where = f"object store {self.endpoint}"
            if code == "NoSuchBucket" or (status == 404 and code is None):
                raise StorageUnavailable(f"{where}: bucket {self.location.bucket!r} does not exist") from None
            if code in _CREDENTIAL_CODES or status in (401, 403) or isinstance(
                    exc, PermissionDeniedError | UnauthenticatedError):
                raise StorageUnavailable(f"{where} refused the credentials for bucket {self.location.bucket!r} "
                                         f"({code or status}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                                         ) from None
            raise StorageUnavailable(f"{where} is unreachable for {self.location}: {line}") from None

    def _key(self, blob_id: str) -> str:
        if not _BLOB_ID.fullmatch(blob_id):
            raise CorruptBlock(f"malformed blob id {blob_id!r}")
        return f"{self.namespace}/{blob_id}"

    def _unavailable(self, op: str, blob_id: str, reason: BaseException | str) -> StorageUnavailable:
        """The error a request sees (its detail reaches API callers: no endpoint, bucket or client text); the
        operator's log gets the whole reason."""
        text = reason if isinstance(reason, str) else _reason(reason)[2]
        what = f"{op} of blob {blob_id[:12]}" if blob_id else op
        log.warning("object store %s (%s/%s): %s failed: %s", self.endpoint, self.location, self.namespace, what, text)
        return StorageUnavailable(f"object store unavailable: {what} failed; retry later")

    def put(self, data: bytes, *, replace: bool = False) -> str:
        """Upload (always: content-addressed, so idempotent, and it restarts the blob's age), then cache."""
        blob_id = blob_id_of(data)
        key = self._key(blob_id)
        if replace and self.cache is not None:
            self.cache.discard(blob_id)
        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except _Errors as exc:
            raise self._unavailable("put", blob_id, exc) from None
        if self.cache is not None:
            self.cache.put(blob_id, data)
        return blob_id

    def get(self, blob_id: str) -> bytes:
        key = self._key(blob_id)
        if self.cache is not None and (cached := self.cache.get(blob_id)) is not None:
            return cached
        data = self._fetch(key, blob_id)
        if self.cache is not None:
            self.cache.put(blob_id, data)
        return data

    def _fetch(self, key: str, blob_id: str) -> bytes:
        self.fetches += 1
        try:
            result = obstore.get(self._store, key)
            size = int(result.meta["size"])
            data = bytes(result.bytes())
        except (FileNotFoundError, NotFoundError):
            raise CorruptBlock(f"blob {blob_id[:12]} is missing") from None
        except _Errors as exc:
            raise self._unavailable("get", blob_id, exc) from None
        if len(data) != size:  # a body cut short must never pass for the blob
            raise self._unavailable("get", blob_id, f"body of {len(data)} bytes, object of {size}")
        if blob_id_of(data) != blob_id:
            raise CorruptBlock(f"blob {blob_id[:12]} does not match its checksum")
        return data

    def exists(self, blob_id: str) -> bool:
        key = self._key(blob_id)
        try:
            obstore.head(self._store, key)
        except (FileNotFoundError, NotFoundError):
            return False
        except _Errors as exc:
            raise self._unavailable("head", blob_id, exc) from None
        return True

    def delete(self, blob_id: str) -> None:
        key = self._key(blob_id)
        if self.cache is not None:
            self.cache.discard(blob_id)
        try:
            obstore.delete(self._store, key)
        except (FileNotFoundError, NotFoundError):
            pass
        except _Errors as exc:
            raise self._unavailable("delete", blob_id, exc) from None

    def _listing(self) -> Iterator[tuple[str, float]]:
        """(blob id, last-modified seconds) of every blob object directly in this store's namespace."""
        head = self.namespace + "/"
        try:
            for chunk in obstore.list(self._store, prefix=self.namespace, chunk_size=1000):
                for meta in chunk:
                    path = meta["path"]
                    blob_id = path[len(head):] if path.startswith(head) else ""
                    if _BLOB_ID.fullmatch(blob_id):
                        yield blob_id, meta["last_modified"].timestamp()
        except _Errors as exc:
            raise self._unavailable("listing", "", exc) from None

    def ids(self) -> Iterator[str]:
        for blob_id, _ in self._listing():
            yield blob_id

    def ids_older_than(self, cutoff: float) -> Iterator[str]:
        for blob_id, modified in self._listing():
            if modified + _MTIME_RESOLUTION_S < cutoff:
                yield blob_id

"""Fetches the bytes of one image from http(s)://, gs://, file:// or a local path.

:func:`fetch_bytes` is read-only and therefore idempotent: Beam may retry a bundle and fetch an
image twice without harm. Failures raise :class:`FetchFailed` with a reason code, never a raw
exception, so the pipeline routes every failure to ``rejected.csv``.

HTTP: ``urllib`` with a per-attempt timeout; bounded retries with exponential backoff and
jitter only for failures that may pass (connection errors, timeouts, HTTP 5xx and 429), never
for 404 and other 4xx; on 429 and 503 a server's ``Retry-After`` (seconds or an HTTP date,
parsed by urllib3's ``Retry``) is waited out first, up to ``max_retry_after_seconds``; a byte
cap checked against ``Content-Length`` and enforced by a bounded read; redirects only to
http(s). Everything else goes through Beam's ``FileSystems`` (local, ``file://``, ``gs://``).

urllib3's ``Retry`` as a whole drives urllib3's own connection pools; this module keeps
``urllib``'s opener (its redirect rule, its error types) and takes from ``Retry`` the header
parsing, where the corner cases are.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_LOGGER = logging.getLogger(__name__)

REASONS = frozenset(
    {"missing_file", "connection_refused", "connection_error", "timeout", "too_large",
     "unsupported_scheme", "bad_url", "read_error"}
)
"""Reason codes of :class:`FetchFailed`, besides ``http_<status>`` (e.g. ``http_404``)."""

_HTTP_REASON = re.compile(r"^http_\d{3}$")
_CHUNK_BYTES = 1 << 16


class FetchFailed(Exception):
    """The bytes could not be fetched; ``reason`` is in :data:`REASONS` or ``http_<status>``."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False,
                 retry_after: float | None = None):
        if reason not in REASONS and not _HTTP_REASON.match(reason):
            raise ValueError(f"unknown fetch failure reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if any


@dataclasses.dataclass(frozen=True)
class FetchParams:
    """How images are fetched.

    Attributes:
      timeout_seconds: per-attempt HTTP timeout (connect and each read), seconds.
      max_attempts: HTTP attempts in all (1 = no retry).
      backoff_seconds: wait before the 2nd attempt; doubles each retry (0.5, 1, 2, ... s).
      max_backoff_seconds: cap on one backoff wait, seconds. Each wait is drawn uniformly in
        [1/2, 1] of its exponential value (jitter: parallel workers that failed together do not
        retry in step).
      max_retry_after_seconds: the longest ``Retry-After`` (429, 503) waited out, seconds; a
        server asking for longer fails the fetch at once (no worker sleeps for minutes).
      max_bytes: largest accepted file in bytes; larger ones fail with ``too_large``.
      base_dir: folder against which relative local paths are resolved (the manifest's folder).
    """

    timeout_seconds: float = 10.0
    max_attempts: int = 3
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0
    max_retry_after_seconds: float = 60.0
    max_bytes: int = 50 * 1024 * 1024
    base_dir: str = ""

    def __post_init__(self):
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if (self.backoff_seconds < 0 or self.max_backoff_seconds < 0
                or self.max_retry_after_seconds < 0):
            raise ValueError("backoff times must be >= 0")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")


# Characters an http(s) URL may not hold unencoded: ASCII controls, space and DEL.
_UNSAFE_IN_URL = re.compile(r"[\x00-\x20\x7f]")


def resolve_location(url: str, base_dir: str = "") -> str:
    """Maps a manifest ``url`` to what is fetched: an http(s) URL or a FileSystems path.

    ``file://`` URLs become local paths; a relative local path is joined to ``base_dir`` (so a
    dataset folder with its manifest can be moved, also to ``gs://``).

    Raises:
      FetchFailed: ``unsupported_scheme`` (ftp://, data:, s3://, ...) or ``bad_url``.
    """
    url = url.strip()
    if not url:
        raise FetchFailed("bad_url", "empty url")
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise FetchFailed("bad_url", f"no host in {url!r}")
        unsafe = _UNSAFE_IN_URL.search(url)
        if unsafe:  # http.client would refuse it (InvalidURL), and retrying cannot help
            raise FetchFailed("bad_url", f"{unsafe.group()!r} at position {unsafe.start()} of "
                                         f"{url!r}: control characters and spaces must be "
                                         "percent-encoded")
        return url
    if scheme == "gs":
        if not parsed.netloc:
            raise FetchFailed("bad_url", f"no bucket in {url!r}")
        return url
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise FetchFailed("bad_url", f"file:// URL with a remote host {parsed.netloc!r}")
        return urllib.request.url2pathname(parsed.path)
    if scheme == "":
        if url.startswith("/") or not base_dir:
            return url
        return FileSystems.join(base_dir, url)
    raise FetchFailed("unsupported_scheme", f"{scheme}:// is not one of http, https, gs, file")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise FetchFailed("unsupported_scheme", f"redirect to {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects())


def _read_capped(stream, max_bytes: int, where: str) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(_CHUNK_BYTES, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise FetchFailed("too_large", f"{where}: more than {max_bytes} bytes")


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, (socket.timeout, TimeoutError)) or "timed out" in str(error)


def _http_attempt(url: str, params: FetchParams) -> bytes:
    """One HTTP GET; raises FetchFailed with ``retryable`` set for transient failures."""
    request = urllib.request.Request(url, headers={"User-Agent": "landmarks-ingest/0.1"})
    try:
        with _OPENER.open(request, timeout=params.timeout_seconds) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > params.max_bytes:
                raise FetchFailed("too_large", f"Content-Length {length} > {params.max_bytes}")
            return _read_capped(response, params.max_bytes, url)
    except FetchFailed:
        raise
    except urllib.error.HTTPError as error:
        retryable = error.code == 429 or error.code >= 500
        retry_after = _retry_after_seconds(error) if error.code in (429, 503) else None
        raise FetchFailed(f"http_{error.code}", str(error.reason), retryable,
                          retry_after) from error
    except urllib.error.URLError as error:
        cause = error.reason
        if isinstance(cause, ConnectionRefusedError):
            raise FetchFailed("connection_refused", str(cause), True) from error
        if _is_timeout(cause if isinstance(cause, BaseException) else error):
            raise FetchFailed("timeout", f"after {params.timeout_seconds} s", True) from error
        raise FetchFailed("connection_error", str(cause), True) from error
    except ConnectionRefusedError as error:
        raise FetchFailed("connection_refused", str(error), True) from error
    except (socket.timeout, TimeoutError) as error:
        raise FetchFailed("timeout", f"after {params.timeout_seconds} s", True) from error
    except (http.client.HTTPException, ConnectionError, OSError) as error:
        if _is_timeout(error):
            raise FetchFailed("timeout", f"after {params.timeout_seconds} s", True) from error
        raise FetchFailed("connection_error", f"{type(error).__name__}: {error}", True) from error
    except ValueError as error:  # urllib's "unknown url type", bad ports, ...
        raise FetchFailed("bad_url", str(error)) from error


def _retry_after_seconds(error: urllib.error.HTTPError) -> float | None:
    """The ``Retry-After`` of a response in seconds (a number or an HTTP date), or None when
    absent or unreadable (then the backoff alone decides)."""
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    value = error.headers.get("Retry-After") if error.headers is not None else None
    if not value:
        return None
    try:
        return float(Retry().parse_retry_after(value.strip()))
    except InvalidHeader:
        return None


def retry_wait(attempt: int, params: FetchParams, retry_after: float | None,
               rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 2``: the exponential backoff with jitter
    (uniform in [1/2, 1] of ``backoff_seconds * 2**attempt``, capped), and never less than the
    server's ``Retry-After``."""
    backoff = min(params.backoff_seconds * 2**attempt, params.max_backoff_seconds)
    wait = backoff * (rng or random).uniform(0.5, 1.0)
    return max(wait, retry_after or 0.0)


def _fetch_http(url: str, params: FetchParams, sleep=time.sleep) -> bytes:
    for attempt in range(params.max_attempts):
        try:
            return _http_attempt(url, params)
        except FetchFailed as failure:
            too_long = (failure.retry_after is not None
                        and failure.retry_after > params.max_retry_after_seconds)
            if too_long:
                failure.detail = (f"{failure.detail} (Retry-After {failure.retry_after:g} s > "
                                  f"{params.max_retry_after_seconds:g} s, not retried)")
            if not failure.retryable or too_long or attempt + 1 == params.max_attempts:
                if attempt:
                    failure.detail = f"{failure.detail} (after {attempt + 1} attempts)"
                raise
            wait = retry_wait(attempt, params, failure.retry_after)
            _LOGGER.debug("retrying %s in %.2f s after %s", url, wait, failure)
            sleep(wait)
    raise AssertionError("unreachable")


def _fetch_file(path: str, params: FetchParams) -> bytes:
    try:
        if not FileSystems.exists(path):
            raise FetchFailed("missing_file", path)
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return _read_capped(handle, params.max_bytes, path)
    except FetchFailed:
        raise
    except FileNotFoundError as error:
        raise FetchFailed("missing_file", path) from error
    except Exception as error:  # FileSystems back-ends raise many types (BeamIOError, API errors)
        raise FetchFailed("read_error", f"{path}: {type(error).__name__}: {error}") from error


def fetch_bytes(url: str, params: FetchParams = FetchParams()) -> bytes:
    """The bytes at ``url`` (http(s)://, gs://, file:// or a local path), at most ``max_bytes``.

    Raises:
      FetchFailed: with a reason code; transient HTTP failures are retried first.
    """
    location = resolve_location(url, params.base_dir)
    if re.match(r"^https?://", location, re.IGNORECASE):
        return _fetch_http(location, params)
    return _fetch_file(location, params)

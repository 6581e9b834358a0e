"""Reusable pytest fixtures for remote sources, all on 127.0.0.1 (no internet needed).

- ``http_server``: serves a temporary folder over HTTP with extra routes for failure cases.
- ``gcs_emulator``: an in-process ``gcp-storage-emulator`` with one bucket, wired so that both
  google-cloud-storage and Beam's ``gs://`` file system talk to it anonymously.

``tests/conftest.py`` imports both, so every test module can use them by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HttpServer:
    """A running test HTTP server.

    Routes (``name`` is a file under :attr:`root`):
      ``/files/<name>``: the file (404 if missing), ``Content-Type`` guessed from the suffix.
      ``/status/<code>``: an empty response with that status code.
      ``/flaky/<n>/<name>``: 500 for the first ``n`` requests to this URL, then the file.
      ``/slow/<name>``: waits :attr:`slow_seconds` before answering with the file.
      ``/as_jpeg/<name>``: the file served as ``image/jpeg`` whatever it holds (HTML, text).
      ``/no_length/<name>``: the file without a ``Content-Length`` header (read until close).
      ``/retry_after/<code>/<n>/<value>/<name>``: status ``code`` (429, 503) with the header
        ``Retry-After: <value>`` for the first ``n`` requests to this URL, then the file.

    :attr:`request_times` holds each path's request arrival times (``time.monotonic()``).
    """

    root: Path
    port: int
    slow_seconds: float
    request_counts: dict[str, int]
    request_times: dict[str, list] = dataclasses.field(default_factory=dict)

    def url(self, route: str) -> str:
        """Absolute URL of ``route`` (e.g. ``"files/a.jpg"``)."""
        return f"http://127.0.0.1:{self.port}/{route.lstrip('/')}"

    @staticmethod
    def refused_url(name: str = "image.jpg") -> str:
        """A URL on a port where nothing listens: connecting is refused."""
        return f"http://127.0.0.1:{free_port()}/files/{name}"


def _make_handler(server_state: HttpServer):
    content_types = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                     ".gif": "image/gif", ".html": "text/html", ".txt": "text/plain"}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # keep test output quiet
            pass

        def _send(self, code: int, body: bytes, content_type: str, with_length: bool = True,
                  headers: dict | None = None):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if with_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def _file(self, name: str) -> bytes | None:
            path = (server_state.root / urllib.parse.unquote(name)).resolve()
            if server_state.root.resolve() not in path.parents or not path.is_file():
                return None
            return path.read_bytes()

        def _serve_file(self, name: str, content_type: str | None = None,
                        with_length: bool = True):
            body = self._file(name)
            if body is None:
                self._send(404, b"not found", "text/plain")
                return
            guessed = content_types.get(Path(name).suffix.lower(), "application/octet-stream")
            self._send(200, body, content_type or guessed, with_length)

        def do_GET(self):
            path = urllib.parse.urlparse(self.path).path
            counts = server_state.request_counts
            counts[path] = counts.get(path, 0) + 1
            server_state.request_times.setdefault(path, []).append(time.monotonic())
            parts = path.lstrip("/").split("/", 1)
            route, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if route == "files":
                self._serve_file(rest)
            elif route == "status":
                self._send(int(rest), b"", "text/plain")
            elif route == "flaky":
                failures, name = rest.split("/", 1)
                if counts[path] <= int(failures):
                    self._send(500, b"try again", "text/plain")
                else:
                    self._serve_file(name)
            elif route == "slow":
                time.sleep(server_state.slow_seconds)
                self._serve_file(rest)
            elif route == "as_jpeg":
                self._serve_file(rest, content_type="image/jpeg")
            elif route == "no_length":
                self._serve_file(rest, with_length=False)
            elif route == "retry_after":
                code, failures, value, name = rest.split("/", 3)
                if counts[path] <= int(failures):
                    self._send(int(code), b"slow down", "text/plain",
                               headers={"Retry-After": urllib.parse.unquote(value)})
                else:
                    self._serve_file(name)
            else:
                self._send(404, b"no such route", "text/plain")

    return Handler


@pytest.fixture
def http_server(tmp_path):
    """Yields an :class:`HttpServer` serving ``tmp_path / "http_root"`` on 127.0.0.1."""
    root = tmp_path / "http_root"
    root.mkdir()
    state = HttpServer(root=root, port=0, slow_seconds=3.0, request_counts={})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    httpd.block_on_close = False
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-http", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Google Cloud Storage emulator
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GcsEmulator:
    """A running storage emulator with one empty bucket.

    Attributes:
      bucket: the bucket name; ``gs://{bucket}/...`` paths work in Beam and in :attr:`client`.
      client: an anonymous ``google.cloud.storage.Client`` talking to the emulator.
      host: ``http://127.0.0.1:<port>`` (also in the ``STORAGE_EMULATOR_HOST`` env variable).
    """

    bucket: str
    client: object
    host: str

    def path(self, *names: str) -> str:
        """``gs://bucket/names...``."""
        return "/".join([f"gs://{self.bucket}", *names])

    def upload(self, name: str, data: bytes | str) -> str:
        """Uploads ``data`` to object ``name``; returns its ``gs://`` path."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.client.bucket(self.bucket).blob(name).upload_from_string(data)
        return self.path(name)

    def download(self, name: str) -> bytes:
        return self.client.bucket(self.bucket).blob(name).download_as_bytes()

    def list_names(self, prefix: str = "") -> list[str]:
        return sorted(blob.name for blob in self.client.list_blobs(self.bucket, prefix=prefix))


@contextlib.contextmanager
def _beam_anonymous_gcs():
    """Makes Beam's GCS client anonymous (no ~20 s credential lookup) for the duration.

    Beam 2.77 builds its client with ``storage.Client.create_anonymous_client()`` when it finds
    no credentials, and google-cloud-storage honours ``STORAGE_EMULATOR_HOST``. Beam caches
    the credential lookup in ``apache_beam.internal.gcp.auth._Credentials``; pre-filling that
    cache with "no credentials" skips the lookup. Restored afterwards.
    """
    from apache_beam.internal.gcp import auth

    saved = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials_init = True
        auth._Credentials._credentials = None
    try:
        yield
    finally:
        with auth._Credentials._credentials_lock:
            auth._Credentials._credentials_init, auth._Credentials._credentials = saved


@pytest.fixture
def gcs_emulator(monkeypatch):
    """Yields a :class:`GcsEmulator` on a free 127.0.0.1 port with a fresh bucket."""
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage

    port = free_port()
    host = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        with _beam_anonymous_gcs():
            client = storage.Client.create_anonymous_client()
            client.project = "test-project"
            bucket = f"test-bucket-{uuid.uuid4().hex[:8]}"
            client.create_bucket(bucket)
            yield GcsEmulator(bucket=bucket, client=client, host=host)
    finally:
        server.stop()

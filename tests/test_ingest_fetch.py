"""Fetching bytes: local paths, file://, HTTP (status codes, retries, timeouts, caps), gs://."""

from __future__ import annotations

import pytest

from beam_pipelines.ingest.fetch import FetchFailed, FetchParams, fetch_bytes, resolve_location

FAST = FetchParams(timeout_seconds=0.5, max_attempts=3, backoff_seconds=0.01)
PAYLOAD = b"\xff\xd8\xff\xe0 not really a jpeg but bytes are bytes" * 10


def failure_of(url: str, params: FetchParams = FAST) -> FetchFailed:
    with pytest.raises(FetchFailed) as caught:
        fetch_bytes(url, params)
    return caught.value


def test_local_absolute_relative_and_file_url(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "a.jpg"
    path.write_bytes(PAYLOAD)
    assert fetch_bytes(str(path), FAST) == PAYLOAD
    assert fetch_bytes(path.as_uri(), FAST) == PAYLOAD  # file:///...
    relative = FetchParams(base_dir=str(tmp_path), timeout_seconds=1)
    assert fetch_bytes("images/a.jpg", relative) == PAYLOAD


def test_local_missing_file_and_empty_file(tmp_path):
    assert failure_of(str(tmp_path / "nope.jpg")).reason == "missing_file"
    assert failure_of((tmp_path / "nope.jpg").as_uri()).reason == "missing_file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert fetch_bytes(str(tmp_path / "empty.jpg"), FAST) == b""  # normalise rejects it as empty


def test_local_file_over_the_cap(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(PAYLOAD)
    capped = FetchParams(max_bytes=len(PAYLOAD) - 1)
    assert failure_of(str(path), capped).reason == "too_large"
    assert fetch_bytes(str(path), FetchParams(max_bytes=len(PAYLOAD))) == PAYLOAD


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "s3://bucket/a.jpg", "data:image/png;base64,AAAA",
            "javascript:alert(1)"],
)
def test_unsupported_schemes(url):
    assert failure_of(url).reason == "unsupported_scheme"


@pytest.mark.parametrize("url", ["http://example.com/a b.jpg", "https://example.com/a\tb.jpg",
                                 "http://example.com/a\x00.jpg", "http://example.com/\x7f.jpg"])
def test_http_urls_with_spaces_or_control_characters_are_bad_urls_not_retried(url):
    failure = failure_of(url)
    assert (failure.reason, failure.retryable) == ("bad_url", False)
    assert "percent-encoded" in failure.detail
    # Leading and trailing blanks of a CSV cell are not part of the URL.
    assert resolve_location(" http://example.com/a%20b.jpg ") == "http://example.com/a%20b.jpg"


def test_resolve_location():
    assert resolve_location("a/b.jpg", "/data") == "/data/a/b.jpg"
    assert resolve_location("a/b.jpg", "gs://bucket/set") == "gs://bucket/set/a/b.jpg"
    assert resolve_location("/abs/b.jpg", "/data") == "/abs/b.jpg"
    assert resolve_location("file:///x/y%20z.jpg") == "/x/y z.jpg"
    with pytest.raises(FetchFailed):
        resolve_location("file://otherhost/x.jpg")


def test_http_ok_and_404_is_not_retried(http_server):
    (http_server.root / "a.jpg").write_bytes(PAYLOAD)
    assert fetch_bytes(http_server.url("files/a.jpg"), FAST) == PAYLOAD
    assert fetch_bytes(http_server.url("no_length/a.jpg"), FAST) == PAYLOAD
    failure = failure_of(http_server.url("files/missing.jpg"))
    assert failure.reason == "http_404"
    assert http_server.request_counts["/files/missing.jpg"] == 1


def test_http_other_4xx_is_not_retried(http_server):
    assert failure_of(http_server.url("status/403")).reason == "http_403"
    assert http_server.request_counts["/status/403"] == 1


def test_http_500_then_ok_is_retried_with_success(http_server):
    (http_server.root / "a.jpg").write_bytes(PAYLOAD)
    assert fetch_bytes(http_server.url("flaky/2/a.jpg"), FAST) == PAYLOAD
    assert http_server.request_counts["/flaky/2/a.jpg"] == 3


def test_http_persistent_5xx_and_429_give_up_after_max_attempts(http_server):
    failure = failure_of(http_server.url("status/503"))
    assert failure.reason == "http_503" and "3 attempts" in failure.detail
    assert http_server.request_counts["/status/503"] == 3
    assert failure_of(http_server.url("status/429")).reason == "http_429"
    assert http_server.request_counts["/status/429"] == 3


def test_http_connection_refused(http_server):
    assert failure_of(http_server.refused_url()).reason == "connection_refused"


def test_http_timeout_is_retried_then_reported(http_server):
    (http_server.root / "a.jpg").write_bytes(PAYLOAD)
    params = FetchParams(timeout_seconds=0.3, max_attempts=2, backoff_seconds=0.01)
    failure = failure_of(http_server.url("slow/a.jpg"), params)
    assert failure.reason == "timeout"
    assert http_server.request_counts["/slow/a.jpg"] == 2


def test_http_size_cap_by_header_and_by_bounded_read(http_server):
    (http_server.root / "a.jpg").write_bytes(PAYLOAD)
    capped = FetchParams(max_bytes=len(PAYLOAD) - 1, timeout_seconds=1)
    assert failure_of(http_server.url("files/a.jpg"), capped).reason == "too_large"
    assert failure_of(http_server.url("no_length/a.jpg"), capped).reason == "too_large"


def test_http_html_served_as_jpeg_is_fetched_as_bytes(http_server):
    (http_server.root / "page.html").write_bytes(b"<html>login</html>")
    assert fetch_bytes(http_server.url("as_jpeg/page.html"), FAST) == b"<html>login</html>"


def test_gcs_object_and_missing_object(gcs_emulator):
    url = gcs_emulator.upload("images/a.jpg", PAYLOAD)
    assert fetch_bytes(url, FAST) == PAYLOAD
    assert fetch_bytes("images/a.jpg", FetchParams(base_dir=gcs_emulator.path())) == PAYLOAD
    assert failure_of(gcs_emulator.path("images/missing.jpg")).reason == "missing_file"


def test_params_are_validated():
    with pytest.raises(ValueError):
        FetchParams(max_attempts=0)
    with pytest.raises(ValueError):
        FetchParams(timeout_seconds=0)


# ---- Retry-After and jitter (issue 18) --------------------------------------------------------


def test_ingest_waits_out_retry_after_before_it_retries(http_server, tmp_path):
    """Through landmarks-ingest: a 429 with ``Retry-After: 2`` is retried no sooner than 2 s
    later, although the backoff alone would wait 0.01 s (the server's clock: request times)."""
    import json

    from beam_pipelines.ingest import pipeline
    from test_ingest_pipeline import jpeg

    (http_server.root / "a.jpg").write_bytes(jpeg(1))
    route = "retry_after/429/1/2/a.jpg"
    (tmp_path / "m.csv").write_text(f"id,url,landmark_id\na,{http_server.url(route)},5\n")
    assert pipeline.main(["--manifest", str(tmp_path / "m.csv"), "--output_dir",
                          str(tmp_path / "out"), "--num_shards", "1", "--max_attempts", "3",
                          "--backoff_seconds", "0.01", "--runner=FnApiRunner"]) == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["written"] == 1
    first, second = http_server.request_times["/" + route]
    assert second - first >= 2.0


def test_retry_after_as_an_http_date_on_503_and_too_long_a_wait(http_server):
    import email.utils
    import time as time_lib
    import urllib.parse

    (http_server.root / "a.jpg").write_bytes(PAYLOAD)
    # An HTTP date 2 s ahead (whole seconds): the retry comes after that second has begun.
    when = email.utils.formatdate(time_lib.time() + 2, usegmt=True)
    route = f"retry_after/503/1/{urllib.parse.quote(when, safe='')}/a.jpg"
    assert fetch_bytes(http_server.url(route), FAST) == PAYLOAD
    first, second = http_server.request_times["/" + route]
    assert second - first >= 1.0
    # A server asking for longer than max_retry_after_seconds: failed at once, not retried.
    params = FetchParams(timeout_seconds=0.5, max_attempts=3, backoff_seconds=0.01,
                         max_retry_after_seconds=5)
    failure = failure_of(http_server.url("retry_after/429/9/3600/a.jpg"), params)
    assert failure.reason == "http_429" and "Retry-After 3600 s > 5 s" in failure.detail
    assert http_server.request_counts["/retry_after/429/9/3600/a.jpg"] == 1


def test_backoff_waits_are_jittered_within_their_bounds():
    import random

    from beam_pipelines.ingest.fetch import retry_wait

    params = FetchParams(backoff_seconds=0.5, max_backoff_seconds=8.0)
    rng = random.Random(0)
    for attempt, full in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 8.0)):
        waits = [retry_wait(attempt, params, None, rng) for _ in range(200)]
        assert all(full / 2 <= wait <= full for wait in waits)
        assert len(set(waits)) == len(waits)  # no two workers retry in step
    assert retry_wait(0, params, 3.0, rng) == 3.0  # never sooner than Retry-After

"""Resumable fetch over a real loopback HTTP server that drops connections and fails."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from laionbuild.metadata.transfer import fetch_file

SIZE = 1 << 20
CHUNK = 64 << 10


class FlakyServer:
    """Serves one file with HEAD and Range support. `drop_after` bytes into the first GET it
    closes the connection; the first `fail_first` GETs answer 503."""

    def __init__(self, body: bytes, drop_after: int | None = None, fail_first: int = 0):
        self.body, self.drop_after, self.fail_first = body, drop_after, fail_first
        self.ranges: list[int] = []
        self.gets = 0
        self.served = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                server.gets += 1
                if server.gets <= server.fail_first:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(server.body) - 1
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    end = min(int(match.group(2) or end), end)
                server.ranges.append(start)
                data = server.body[start:end + 1]
                self.send_response(206 if match else 200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(server.body)}")
                self.end_headers()
                if server.drop_after is not None and start <= server.drop_after < end:
                    cut = server.drop_after - start
                    self.wfile.write(data[:cut])
                    server.served += cut
                    server.drop_after = None
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)
                server.served += len(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/part-00000.parquet"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def body():
    return os.urandom(SIZE)


def test_dropped_connection_resumes_from_the_bytes_on_disk(tmp_path, body):
    server = FlakyServer(body, drop_after=5 * CHUNK + 100)
    try:
        info = fetch_file(server.url, tmp_path / "out.parquet", tmp_path / "out.partial", retries=3, backoff=0,
                          chunk=CHUNK)
    finally:
        server.close()
    assert (tmp_path / "out.parquet").read_bytes() == body
    assert info["md5"] == hashlib.md5(body).hexdigest() and info["size"] == SIZE
    assert 5 * CHUNK in server.ranges  # the retry asked for the rest, not the start
    assert server.served < SIZE + 2 * CHUNK  # a restart from byte 0 would serve SIZE + 5 chunks more
    assert not (tmp_path / "out.partial").exists()


def test_partial_file_of_a_killed_run_is_continued(tmp_path, body):
    (tmp_path / "out.partial").write_bytes(body[: 7 * CHUNK])
    server = FlakyServer(body)
    try:
        fetch_file(server.url, tmp_path / "out.parquet", tmp_path / "out.partial", backoff=0, chunk=CHUNK)
    finally:
        server.close()
    assert (tmp_path / "out.parquet").read_bytes() == body
    assert min(server.ranges) == 7 * CHUNK


def test_transient_errors_are_retried_then_reported(tmp_path, body):
    server = FlakyServer(body, fail_first=2)
    try:
        fetch_file(server.url, tmp_path / "a", tmp_path / "a.partial", retries=3, backoff=0, chunk=CHUNK)
        assert (tmp_path / "a").read_bytes() == body
        server.gets, server.fail_first = 0, 10
        with pytest.raises(OSError, match="after 3 attempt"):
            fetch_file(server.url, tmp_path / "b", tmp_path / "b.partial", retries=2, backoff=0, chunk=CHUNK)
        assert not (tmp_path / "b").exists()
    finally:
        server.close()


def test_missing_source_is_not_retried(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        fetch_file(str(tmp_path / "nope.parquet"), tmp_path / "x", tmp_path / "x.partial", retries=5, backoff=10)

"""Serve a folder over HTTP on 127.0.0.1 for the duration of a download, so the bundled demo goes
through img2dataset's real HTTP path with no internet."""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from laionbuild.recipe.errors import MissingInputError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass


@contextmanager
def serve_folder(root: str | Path) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of a server for `root`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"download.local_server.root: {root} is not a directory")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()

"""Resumable, verified file transfer over any fsspec URL (local path, http(s), s3, ...).

An interrupted transfer continues from the bytes already on disk (HTTP range requests for
http); transient errors are retried with exponential backoff; the file is only renamed to its
final name once its size matches the source's."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import fsspec

from laionbuild.project.files import digest
from laionbuild.recipe.errors import InputError, MissingInputError

log = logging.getLogger(__name__)
CHUNK = 8 << 20


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status >= 500 or exc.status == 429
        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    from fsspec.exceptions import FSTimeoutError

    return isinstance(exc, (OSError, asyncio.TimeoutError, FSTimeoutError, TimeoutError, ConnectionError))


def md5_of(path: Path) -> str:
    return digest(path, "md5")


def fetch_file(url: str, dest: Path, partial: Path, retries: int = 5, backoff: float = 1.0,
               chunk: int = CHUNK) -> dict:
    """Copy `url` to `dest`, resuming from `partial`. Returns {url, size, md5}."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise MissingInputError(f"{url}: not found") from None
    partial.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        offset = partial.stat().st_size if partial.exists() else 0
        if size is not None and offset > size:
            partial.unlink()
            offset = 0
        try:
            # block_size = chunk: one range request per chunk, so progress is saved chunk by chunk
            with fs.open(path, "rb", block_size=chunk) as src, open(partial, "ab") as dst:
                if offset:
                    src.seek(offset)
                    log.info("%s: resuming at byte %d of %s", url, offset, size)
                while data := src.read(chunk):
                    dst.write(data)
                    dst.flush()
            break
        except Exception as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
                hint = " (source.part_pattern or source.files must name files)" \
                    if isinstance(exc, IsADirectoryError) else ""
                raise InputError(f"{url}: cannot read it: {exc.strerror or exc}{hint}") from None
            if not _transient(exc) or attempt == retries:
                raise OSError(f"{url}: transfer failed after {attempt + 1} attempt(s): {exc!r}") from exc
            wait = backoff * 2**attempt
            log.warning("%s: %r; retrying in %.1fs (%d/%d)", url, exc, wait, attempt + 1, retries)
            time.sleep(wait)
    got = partial.stat().st_size
    if size is not None and got != size:
        raise OSError(f"{url}: got {got} bytes, the source has {size}; rerun to resume")
    digest = md5_of(partial)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)
    return {"url": url, "size": got, "md5": digest}

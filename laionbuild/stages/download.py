"""download: img2dataset fetches and resizes the images of one part into webdataset shards
(`data/images/part_N/NNNNN.tar` + `.parquet` + `_stats.json`).

Resume: img2dataset works in `data/.work/download/part_N-<fingerprint>/` in incremental mode, so
a killed run continues from the shards it finished; the fingerprint (params + input checksum)
keeps a changed recipe from resuming stale work. Only a finished part is moved into place.
With `download.shards_url`, the shards are written (and resumed) under that URL instead and the
part's directory gets a manifest of them: see `laionbuild/shards/storage.py`.

Politeness and the URL policy on every hop: img2dataset's workers fetch through the urllib
opener of `laionbuild/web/policy_opener.py` (URL policy on every request and redirect, per-host
concurrency cap across processes, 429 back-off); see docs/download.md. Retry: transient failures
(`laionbuild/web/failures.py`) are re-attempted `download.retry_rounds` times at the end of the stage,
or later on a built part by `laionbuild retry-failed`; new successes are merged into the shard
that held the failure, under the same sample key, as if they had succeeded the first time.

Funnel: every input row ends in exactly one bucket: downloaded ok, refused by the URL policy, or
one failure reason (img2dataset's per-row status, classified).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, atomic_write_bytes, read_json, write_json
from laionbuild.project.funnel import Counts, load_stats
from laionbuild.project.layout import KEY_COLUMN, TMP, WORK, part_dir
from laionbuild.recipe.errors import MissingInputError
from laionbuild.shards.lease import writer
from laionbuild.shards.storage import COMPLETE, MANIFEST, filesystem, is_url, join, part_shards, shards_prefix
from laionbuild.web.failures import classify, transient
from laionbuild.web.local_server import serve_folder
from laionbuild.web.policy_opener import Policy, downloading_with, installed_processes
from laionbuild.web.url_policy import refusals, spread_by_host

log = logging.getLogger(__name__)


def _fingerprint(cfg, metadata: Path) -> str:
    """Names the part's work dir: the settings that change what is downloaded (not the speed
    knobs, recipe.schema.SPEED_KNOBS: a build resumed with more threads resumes in place)."""
    from laionbuild.recipe.schema import without_speed_knobs

    digest = hashlib.sha256()
    settings = without_speed_knobs(_i2d_settings(cfg), "download")
    digest.update(json.dumps([settings, cfg.download.allow_private_urls], sort_keys=True).encode())
    digest.update(metadata.read_bytes())
    return digest.hexdigest()[:16]


def _i2d_settings(cfg) -> dict:
    d = cfg.download
    return dict(
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        encode_format=d.encode_format,
        encode_quality=d.encode_quality,
        number_sample_per_shard=d.number_sample_per_shard,
        processes_count=d.processes_count,
        thread_count=d.thread_count,
        timeout=d.timeout,
        retries=d.retries,
        min_image_size=d.min_image_size,
        max_aspect_ratio=float("inf") if d.max_aspect_ratio is None else d.max_aspect_ratio,
        compute_hash=d.compute_hash,
        max_image_area=float("inf") if d.max_image_area is None else d.max_image_area,
        disallowed_header_directives=list(d.disallowed_header_directives),
        user_agent_token=d.user_agent_token,
    )


def _rewrite(urls: list[str], host: str | None, base: str | None) -> list[str]:
    if not host:
        return urls
    served = urlsplit(base)
    out = []
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname == host:
            parts = parts._replace(scheme=served.scheme, netloc=served.netloc)
        out.append(urlunsplit(parts))
    return out


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.tar"))


def _glob(shards: str, pattern: str) -> list[str]:
    """Files matching `pattern` in a shard folder (a local path or an fsspec URL), sorted."""
    fs, root = filesystem(shards)
    fs.invalidate_cache(root)  # written by img2dataset's processes (or executors), not through this instance
    return sorted(fs.glob(f"{root.rstrip('/')}/{pattern}"))


def _read(shards: str, name: str) -> bytes:
    fs, root = filesystem(shards)
    with fs.open(f"{root.rstrip('/')}/{name}", "rb") as f:
        return f.read()


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].removesuffix("_stats")


def _write(shards: str, name: str, data: bytes) -> None:
    """Replace `name` in a shard folder. Locally: a new file renamed over the old one, so a
    hard-linked original (DVC cache, the work dir) is never modified in place; on an object store
    a put is atomic already."""
    if not is_url(shards):
        atomic_write_bytes(Path(str(shards).removeprefix("file://")) / name, data)
        return
    fs, root = filesystem(shards)
    fs.pipe_file(f"{root.rstrip('/')}/{name}", data)


@contextmanager
def web(cfg):
    """While open: the demo's local server (if any), and img2dataset's workers fetching through
    the policy opener. Yields the URL rewrite for the local server's host."""
    d = cfg.download
    server = d.local_server
    TMP.mkdir(parents=True, exist_ok=True)
    # per-host slots and pauses of this run, shared by its worker processes (file locks)
    state = Path(tempfile.mkdtemp(prefix="hosts.", dir=TMP)).resolve()
    policy = Policy(allow_private=bool(d.allow_private_urls),
                    allowlist=tuple(h.lower() for h in d.private_host_allowlist),
                    max_per_host=d.max_per_host, timeout=float(d.timeout), backoff_base=float(d.backoff_seconds),
                    state_dir=str(state))
    try:
        with serve_folder(server.root) if server.host else nullcontext(None) as base_url, downloading_with(policy):
            yield lambda urls: _rewrite(urls, server.host, base_url)
        log.info("policy opener: %s", {"processes": installed_processes(policy)})
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _img2dataset(cfg, input_path: Path, shards: str) -> None:
    distributor, environment = "multiprocessing", nullcontext()
    if cfg.engine.name == "spark":
        # img2dataset's own Spark path: one task per shard on the session's executors, whose
        # Python workers unpickle the policy downloader (laionbuild.web.policy_opener)
        from laionbuild.engine.spark import executor_environment, spark_session

        distributor, environment = "pyspark", executor_environment(spark_session(cfg.engine))

    with environment:
        _download(cfg, input_path, shards, distributor)


def _download(cfg, input_path: Path, shards: str, distributor: str) -> None:
    import img2dataset

    img2dataset.download(  # absolute paths: executors' workers do not run in this process's directory
        url_list=str(input_path.resolve()),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=[KEY_COLUMN],
        output_folder=shards,
        output_format="webdataset",
        incremental_mode="incremental",
        distributor=distributor,
        enable_wandb=False,
        **_i2d_settings(cfg),
    )


def _shard_rows(shards: str) -> pa.Table:
    """Every row img2dataset wrote (successes and failures) with its shard."""
    tables = []
    for path in _glob(shards, "*.parquet"):
        name = path.rsplit("/", 1)[-1]
        t = pq.read_table(io.BytesIO(_read(shards, name)), columns=["key", "status", "error_message", KEY_COLUMN])
        tables.append(t.append_column("shard", pa.array([_stem(name)] * t.num_rows, pa.string())))
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                         "error_message": pa.array([], pa.string()), KEY_COLUMN: pa.array([], pa.string()),
                         "shard": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def part_counts(attempted: int, refused: dict, shards: str) -> Counts:
    """The part's funnel: every row in exactly one bucket."""
    counts = Counts()
    rows = _shard_rows(shards)
    ok = 0
    for status, message in zip(rows.column("status").to_pylist(), rows.column("error_message").to_pylist()):
        if status == "success":
            ok += 1
        else:
            counts.fail(classify(message), 1)
    for reason, n in refused.items():
        counts.fail(reason, n)
    n_refused = sum(refused.values())
    if ok + sum(counts.failures.values()) != attempted:
        raise RuntimeError(f"download funnel does not add up in {shards}: {attempted} rows, {ok} ok, "
                           f"{sum(counts.failures.values())} failed")
    counts.set("download_attempted", attempted)
    counts.set("refused_by_url_policy", n_refused)
    counts.set("downloaded_ok", ok)
    counts.set("download_failed", attempted - ok)
    return counts


def run(cfg, part: int) -> None:
    with ExitStack() as leases:  # (download.shards_url) held from before the download until the prefix is complete
        _run(cfg, part, leases)


def _run(cfg, part: int, leases: ExitStack) -> None:
    metadata_path = part_dir("dedup", part) / "metadata.parquet"
    if not cfg.download.enabled:  # an embeddings-only build: nothing to fetch, an empty part
        with atomic_dir(part_dir("download", part)) as out:
            Counts().save(out)
        return
    table = pq.read_table(metadata_path, columns=["key", "url", "caption"])
    work = WORK / "download" / f"part_{part}-{_fingerprint(cfg, metadata_path)}"
    work.mkdir(parents=True, exist_ok=True)
    url = cfg.download.shards_url
    # absolute: executors' workers do not run in this process's directory
    shards = shards_prefix(cfg, part) if url else str((work / "shards").resolve())

    with web(cfg) as rewrite:
        urls = rewrite(table.column("url").to_pylist())
        reasons = refusals(urls, cfg.download.allow_private_urls, cfg.download.private_host_allowlist)
        refused = {r: reasons.count(r) for r in sorted(set(filter(None, reasons)))}
        allowed = pa.array([r is None for r in reasons])
        fetch_table = pa.table({"url": urls, "caption": table.column("caption"),
                                KEY_COLUMN: table.column("key")}).filter(allowed)
        # politeness: one host's URLs spread over the run instead of arriving in a burst
        fetch_table = fetch_table.take(pa.array(spread_by_host(fetch_table.column("url").to_pylist()), pa.int64()))
        input_path = work / "input.parquet"
        pq.write_table(fetch_table, input_path)
        # a prefix committed before (same input, same settings: a forced rerun, another
        # experiment's) is taken as it is: never written again; one another build is writing is
        # waited for (laionbuild/shards/lease.py), so that one writer at a time writes a prefix
        lease = None
        if url and fetch_table.num_rows:
            lease = leases.enter_context(writer(shards, lambda: _exists(shards, COMPLETE), describe=f"download@{part}"))
        complete = bool(url) and (lease.complete if lease else _exists(shards, COMPLETE))
        if fetch_table.num_rows and not complete:
            _img2dataset(cfg, input_path, shards)
        stats_files = _glob(shards, "*_stats.json") if fetch_table.num_rows else []
        expected = -(-fetch_table.num_rows // cfg.download.number_sample_per_shard)
        if len(stats_files) != expected:
            raise RuntimeError(f"download of part {part} incomplete: {len(stats_files)}/{expected} shards have "
                               f"stats in {shards}; rerun to resume")
        for round_ in range(0 if complete else cfg.download.retry_rounds):
            if not fetch_table.num_rows or not _transient_failures(shards):
                break
            time.sleep(cfg.download.retry_delay)
            recovered = retry_shards(cfg, shards, table, rewrite, work / f"retry_{round_}")
            log.info("part %d retry round %d: %d recovered", part, round_ + 1, recovered)

    fetched = shards if fetch_table.num_rows else str(work / "none")
    counts = part_counts(table.num_rows, refused, fetched)
    if lease and not lease.complete:
        lease.check()  # still this build's prefix: nobody took it over while it looked dead
    with atomic_dir(part_dir("download", part)) as out:
        if url:
            _commit_manifest(shards, fetched, out)
        else:
            for path in sorted(Path(fetched).iterdir()) if fetch_table.num_rows else []:
                if path.suffix in (".tar", ".parquet") or path.name.endswith("_stats.json"):
                    os.link(path, out / path.name)  # the work dir stays whole until the part is in place
        counts.save(out, refused=refused)
    shutil.rmtree(work, ignore_errors=True)
    log.info("downloaded part %d: %d/%d ok", part, counts.values["downloaded_ok"], table.num_rows)


def _commit_manifest(shards: str, fetched: str, out: Path) -> None:
    """Shards under download.shards_url: their small files are copied into the part's directory
    (funnel, report, readers), the tars stay where they are, listed with their sizes; the listing
    is also written into the prefix (COMPLETE), which marks it as never to be written again."""
    listed, stats = [], []
    if fetched == shards:
        fs, root = filesystem(shards)
        fs.invalidate_cache(root)
        for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
            name = entry["name"].rsplit("/", 1)[-1]
            if name.endswith(".tar"):
                listed.append({"name": name, "size": entry["size"]})
            elif name.endswith(".parquet") or name.endswith("_stats.json"):
                (out / name).write_bytes(_read(shards, name))
                stats += [_stem(name)] if name.endswith("_stats.json") else []
        missing = sorted(set(stats) - {_stem(e["name"]) for e in listed})
        if missing:
            raise MissingInputError(f"{shards}: shards {missing} have stats but no .tar (removed?); delete "
                                    f"{shards} and rerun to download the part again")
    manifest = {"url": shards, "shards": listed}
    if fetched == shards and not _exists(shards, COMPLETE):
        _write(shards, COMPLETE, (json.dumps(manifest, indent=2) + "\n").encode())
    write_json(out / MANIFEST, manifest)


def _exists(shards: str, name: str) -> bool:
    fs, root = filesystem(shards)
    fs.invalidate_cache(root)
    return fs.exists(f"{root.rstrip('/')}/{name}")


# -- retrying transient failures -----------------------------------------------------------------

def _transient_failures(shards: str) -> list[tuple[str, str, str]]:
    """(shard, img2dataset key, our key) of every row that failed for a transient reason."""
    rows = _shard_rows(shards)
    out = []
    for status, message, key, ours, shard in zip(*(rows.column(c).to_pylist() for c in
                                                  ("status", "error_message", "key", KEY_COLUMN, "shard"))):
        if status != "success" and transient(classify(message)):
            out.append((shard, key, ours))
    return out


def retry_shards(cfg, shards: str, metadata: pa.Table, rewrite, scratch: Path) -> int:
    """Re-download the transient failures in `shards` and merge the successes into the shards
    that held them (same sample key, tar members appended, parquet row and stats updated).
    Returns how many were recovered."""
    failed = _transient_failures(shards)
    if not failed:
        return 0
    wanted = {ours: (shard, key) for shard, key, ours in failed}
    keys = metadata.column("key").to_pylist()
    index = [i for i, k in enumerate(keys) if k in wanted]
    subset = metadata.take(pa.array(index, pa.int64()))
    retry_input = pa.table({"url": rewrite(subset.column("url").to_pylist()), "caption": subset.column("caption"),
                            KEY_COLUMN: subset.column("key")})
    retry_input = retry_input.take(pa.array(spread_by_host(retry_input.column("url").to_pylist()), pa.int64()))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    pq.write_table(retry_input, scratch / "input.parquet")
    # img2dataset's output (and its input chunks, in `_tmp`) where executors can write and read:
    # under download.shards_url when the shards are there
    new_shards = (join(cfg.download.shards_url, "_scratch", uuid.uuid4().hex[:12]) if cfg.download.shards_url
                  else str((scratch / "shards").resolve()))
    try:
        return _retry_into(cfg, shards, scratch, new_shards, wanted)
    finally:
        fs, root = filesystem(new_shards)
        fs.invalidate_cache(root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _retry_into(cfg, shards: str, scratch: Path, new_shards: str, wanted: dict) -> int:
    _img2dataset(cfg, scratch / "input.parquet", new_shards)

    new_rows = {}  # our key -> (new shard, new i2d key, parquet row)
    for path in _glob(new_shards, "*.parquet"):
        name = path.rsplit("/", 1)[-1]
        for row in pq.read_table(io.BytesIO(_read(new_shards, name))).to_pylist():
            if row["status"] == "success":
                new_rows[row[KEY_COLUMN]] = (_stem(name), row["key"], row)
    by_shard: dict[str, list[str]] = {}
    for ours in new_rows:
        by_shard.setdefault(wanted[ours][0], []).append(ours)
    for shard, ours_list in sorted(by_shard.items()):
        _merge_into_shard(shards, shard, [(wanted[o][1], *new_rows[o]) for o in sorted(ours_list)], new_shards)
    return len(new_rows)


def _merge_into_shard(shards: str, shard: str, recovered: list, new_shards: str) -> None:
    """`recovered`: (original i2d key, new shard, new i2d key, new parquet row)."""
    members: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    for new_shard in {r[1] for r in recovered}:
        with tarfile.open(fileobj=io.BytesIO(_read(new_shards, f"{new_shard}.tar"))) as tar:
            for info in tar.getmembers():
                if info.isfile():
                    members.setdefault(info.name.split(".", 1)[0], []).append((info, tar.extractfile(info).read()))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(_read(shards, f"{shard}.tar"))) as old, \
            tarfile.open(fileobj=buffer, mode="w") as out:
        for info in old.getmembers():
            out.addfile(info, old.extractfile(info) if info.isfile() else None)
        for original, _, new_key, _ in recovered:
            for info, data in members.get(new_key, []):
                ext = info.name.split(".", 1)[1]
                if ext == "json":
                    meta = json.loads(data)
                    meta["key"] = original
                    data = json.dumps(meta).encode()
                renamed = tarfile.TarInfo(f"{original}.{ext}")
                renamed.size, renamed.mtime, renamed.mode = len(data), info.mtime, info.mode
                out.addfile(renamed, io.BytesIO(data))
    _write(shards, f"{shard}.tar", buffer.getvalue())

    old_table = pq.read_table(io.BytesIO(_read(shards, f"{shard}.parquet")))
    replacement = {original: dict(row, key=original) for original, _, _, row in recovered}
    rows = [replacement.get(row["key"], row) for row in old_table.to_pylist()]
    merged = pa.Table.from_pylist(rows, schema=old_table.schema)
    sink = io.BytesIO()
    pq.write_table(merged, sink)
    _write(shards, f"{shard}.parquet", sink.getvalue())

    stats = json.loads(_read(shards, f"{shard}_stats.json"))
    statuses = merged.column("status").to_pylist()
    messages = merged.column("error_message").to_pylist()
    stats["successes"] = statuses.count("success")
    stats["failed_to_download"] = statuses.count("failed_to_download")
    stats["failed_to_resize"] = statuses.count("failed_to_resize")
    status_dict: dict[str, int] = {}
    for status, message in zip(statuses, messages):
        name = "success" if status == "success" else message
        status_dict[name] = status_dict.get(name, 0) + 1
    stats["status_dict"] = status_dict
    _write(shards, f"{shard}_stats.json", (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())


def retry_part(cfg, part: int) -> tuple[int, int]:
    """`laionbuild retry-failed` for one built part: (transient failures, recovered). The part
    is rebuilt beside the old one (hard links, new files for what changes) and swapped in. Shards
    under download.shards_url are copied to a new prefix first: the old one stays as it was, for
    the builds whose manifest names it."""
    target = part_dir("download", part)
    if not (target / "stats.json").exists():
        raise MissingInputError(f"{target}: part {part} is not downloaded yet; build it first")
    old_stats = load_stats(target)
    metadata = pq.read_table(part_dir("dedup", part) / "metadata.parquet", columns=["key", "url", "caption"])
    failed = len(_transient_failures(str(target)))
    if not failed:
        return 0, 0
    remote = (target / MANIFEST).exists()
    staging_dir = TMP / f"retry_part_{part}.{os.getpid()}"
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir(parents=True)
    if remote:
        part_shards(target)  # the prefix still holds what the manifest lists
        old = read_json(target / MANIFEST)["url"]
        staging = f"{old.rstrip('/')}-retry-{uuid.uuid4().hex[:8]}"  # a new prefix, never an existing one
        fs, root = filesystem(old)
        root = root.rstrip("/")
        new_root = filesystem(staging)[1].rstrip("/")
        fs.makedirs(new_root, exist_ok=True)
        for path in fs.ls(root, detail=False):  # (the prefix is flat: shards and their files)
            name = path.rsplit("/", 1)[-1]
            if name.endswith((".tar", ".parquet", "_stats.json")):
                fs.copy(path, f"{new_root}/{name}")
    else:
        for path in target.iterdir():
            os.link(path, staging_dir / path.name)
        staging = str(staging_dir)
    with web(cfg) as rewrite:
        recovered = retry_shards(cfg, staging, metadata, rewrite, TMP / f"retry_scratch_{part}.{os.getpid()}")
    counts = part_counts(metadata.num_rows, old_stats.get("refused", {}), staging)
    with atomic_dir(target) as out:
        if remote:
            _commit_manifest(staging, staging, out)
        else:
            for path in sorted(staging_dir.iterdir()):
                if path.name != "stats.json":
                    os.link(path, out / path.name)
        counts.save(out, refused=old_stats.get("refused", {}))
    shutil.rmtree(staging_dir, ignore_errors=True)
    return failed, recovered

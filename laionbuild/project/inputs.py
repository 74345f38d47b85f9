"""Files a build reads that DVC does not see, as small fingerprint files DVC does see.

A stage's recipe section names files outside the project (a source part under
`source.base_url`, `source.ids_url`, a head's weights, a local checkpoint, the face detector's
weights, the folder `download.local_server` serves). DVC hashes only what `dvc.yaml` lists, and
a per-part path spelled with `source.part_pattern` cannot be listed there. So the global
`inputs` stage (`always_changed` in dvc.yaml: it runs first on every repro) writes one small
JSON file per input group under `data/inputs/`, and each consuming stage lists its file as a
dependency:

    source/part_N.json   fetch@N       part N's metadata file (and its source.image_embeddings file)
    consolidate.json     consolidate   every source file, when source.consolidate_parts is set
    ids.json             prepare@N     source.ids_url
    word_list.json       prepare@N     prepare.caption_word_list
    language.json        prepare@N     prepare.language_model (fastText's language id)
    local_server.json    download@N    every image file under download.local_server.root
    faces.json           faces@N       what tag.faces.detector resolves to (auto: retinaface or
                                       opencv_haar) and that detector's weights or cascade file
    watermark.json       watermark@N   tag.watermark.weights (the pixel watermark model's checkpoint)
    models.json          embed@N       local checkpoints (embed.pretrained, embed.extra_models.*.pretrained)
                                       and every file of the embed.text_model folder
    heads.json           tag@N         tag.heads weights files (a missing file is recorded as missing)
    blocklists.json      prepare@N     prepare.blocklists hash lists (and card, which names them)
    image_blocklists.json screen@N     select.image_blocklists hash lists (and card); not prepare's: a
                                       new image list reruns nothing before the download's screen
    keywords.json        tag@N         tag.unsafe_keywords, the keyword list (and card)
    clusters.json        clusters      tag.clusters.centroids and tag.clusters.targets files

A local file's fingerprint is its size and md5, the md5 remembered by path, size and mtime
(`files.memo_digest`), so a no-op check costs a stat per file; a remote file's (http(s), s3,
gs, hf, any fsspec URL) is what the store says about it without reading it: size plus ETag /
Last-Modified / Content-MD5 / md5Hash / generation / version id, whichever it gives (one HEAD or
metadata request per file, many at once; for `source.files`, the folder's one listing where it
names the content, as S3's and the Hub's do). A file is rewritten only when its fingerprint
changes, so an unchanged input keeps its md5 and its consumers stay built; since the files are
per part, a republished part refetches that part only.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from laionbuild.project.atomic import atomic_write_text
from laionbuild.project.files import memo_digest
from laionbuild.project.layout import INPUTS

log = logging.getLogger(__name__)

# what a store's `info` says about a file's content (fsspec's http: ETag, Content-MD5, Digest,
# Last-Modified; s3fs: ETag, LastModified, VersionId; gcsfs: md5Hash, crc32c, generation;
# huggingface_hub: blob_id, lfs); never the access time or the request's own headers
CONTENT_KEYS = ("size", "ETag", "etag", "Content-MD5", "Digest", "Last-Modified", "LastModified", "last_modified",
                "mtime", "md5Hash", "crc32c", "generation", "VersionId", "version_id", "blob_id", "lfs", "checksum")
REMOTE_CHECKS = 32  # concurrent metadata requests: 1,112 parts at ~0.1 s each take ~4 s
_PART_FILE = re.compile(r"^source/part_(\d+)\.json$")


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_copy(url: str, input_file: str, key: str) -> Path:
    """Where a stage reads the outside file `url` (a list, an id file, embeddings): the path
    itself when local, else one copy per recorded version under data/.work/inputs/ (fetched
    resumably by the first stage that needs it, under a lock: at 1,112 parts one download
    instead of one per part). The version is the fingerprint the inputs check recorded in
    data/inputs/`input_file`; the store is asked again before and after the copy, and a file
    whose fingerprint (ETag, version, modification time, size) is no longer the recorded one
    (republished after the check) is refused, so no stage reads content DVC did not record. A
    store that says nothing of the content (the inputs check warns of it) cannot be checked.
    `key` names the recipe key."""
    import fcntl
    import hashlib

    from laionbuild.metadata.transfer import fetch_file
    from laionbuild.project.layout import WORK
    from laionbuild.recipe.errors import MissingInputError

    if not is_remote(url):
        path = Path(url.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise MissingInputError(f"{url}: {key}: no such file")
        return path
    version = recorded_inputs(input_file).get(url) or {}
    name = hashlib.sha256(json.dumps([url, version], sort_keys=True).encode()).hexdigest()[:20]
    dest = WORK / "inputs" / name / (url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "file")
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per copy, whatever the number of stage processes
        if dest.is_file():
            return dest
        _same_version(url, version, input_file, key)
        fetched = dest.with_name(dest.name + ".fetched")
        info = fetch_file(url, fetched, dest.with_name(dest.name + ".partial"))
        try:
            _same_version(url, version, input_file, key, size=info.get("size"))
        except BaseException:
            fetched.unlink()
            raise
        fetched.rename(dest)
    return dest


def _same_version(url: str, version: dict, input_file: str, key: str, size: int | None = None) -> None:
    """Refuse `url` when what the store says now (or the fetched `size`) is not `version`."""
    from laionbuild.recipe.errors import InputError

    now = remote_fingerprint(url)
    if size is not None:
        now = {**now, "size": size}
    wrong = [k for k in sorted(set(version) & set(now)) if version[k] != now[k]]
    if wrong or (now.get("missing") and not version.get("missing")):
        field = wrong[0] if wrong else "missing"
        raise InputError(f"{url}: {key}: the file changed after the inputs check recorded it ({field} "
                         f"{now.get(field)!r}, recorded {version.get(field)!r} in data/inputs/{input_file}); build "
                         "again: the check records the new version and reruns what reads it")


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def remote_fingerprint(url: str, retries: int = 3, backoff: float = 1.0) -> dict:
    """What the store at `url` says about the file's content, without reading it. A missing
    file is recorded as missing (the stage that reads it says so); transient errors (5xx, 429,
    timeouts) are retried with backoff, then fail the check naming the URL."""
    import fsspec

    from laionbuild.metadata.transfer import _transient

    fs, path = fsspec.core.url_to_fs(url)
    for attempt in range(retries + 1):
        try:
            info = fs.info(path)
            break
        except Exception as exc:  # noqa: BLE001 - classified as transfer.fetch_file does
            # fsspec's http says FileNotFoundError for any failed HEAD and GET (a 503 too): its cause tells
            cause = exc.__cause__ if isinstance(exc, FileNotFoundError) else exc
            if isinstance(exc, FileNotFoundError) and (cause is None or not _transient(cause)):
                return {"missing": True}
            if not _transient(cause) or attempt == retries:
                raise OSError(f"{url}: cannot check it ({cause!r}); the build's input check needs its size "
                              "and ETag or modification time") from exc
            time.sleep(backoff * 2**attempt)
    return {k: _plain(info[k]) for k in CONTENT_KEYS if info.get(k) is not None}


def _listed_fingerprint(info: dict) -> dict | None:
    """A remote file's fingerprint from what its folder's listing says, when that names the
    content (an ETag, checksum or version, not only a size); else None (a HEAD is needed)."""
    found = {k: _plain(info[k]) for k in CONTENT_KEYS if info.get(k) is not None}
    return found if set(found) - {"size", "mtime", "last_modified", "LastModified"} else None


def local_fingerprint(path: str | Path) -> dict:
    path = Path(str(path).removeprefix("file://")).expanduser()
    if not path.is_file():
        return {"missing": True}
    return {"size": path.stat().st_size, "md5": memo_digest(path)}


def fingerprint(url: str) -> dict:
    """A file's fingerprint, local or remote: equal fingerprints, equal contents."""
    return remote_fingerprint(url) if is_remote(url) else local_fingerprint(url)


def _fingerprints(urls: list[str]) -> dict[str, dict]:
    """Every file's fingerprint, checked concurrently (remote ones wait on the network, local
    ones on the disk; md5 releases the GIL)."""
    unique = list(dict.fromkeys(urls))
    if len(unique) <= 1:
        return {u: fingerprint(u) for u in unique}
    with ThreadPoolExecutor(max_workers=min(REMOTE_CHECKS, len(unique))) as pool:
        return dict(zip(unique, pool.map(fingerprint, unique)))


def _faces(cfg) -> tuple[dict, list[str]]:
    """(what tag.faces.detector resolves to, the file that detector reads), as make_detector
    resolves it, without importing the detector."""
    from laionbuild.models.face_detectors import default_retinaface_weights, haar_cascade_path, retinaface_available

    f = cfg.tag.faces
    if f.detector == "none":
        return {"detector": "none"}, []
    retinaface = Path(f.weights).expanduser() if f.weights else default_retinaface_weights()
    detector = f.detector
    if detector == "auto":
        detector = "retinaface" if retinaface.is_file() and retinaface_available() else "opencv_haar"
    if detector == "retinaface":
        return {"detector": detector}, [str(retinaface)]
    cascade = f.weights if f.detector == "opencv_haar" and f.weights else haar_cascade_path()
    return {"detector": detector}, [str(cascade)]


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}


def _local_server_files(cfg) -> list[str]:
    """The images the download may fetch from the folder it serves (the demo's `demo/` also
    holds the source parts, which only fetch reads)."""
    root = cfg.download.local_server.root
    if not root or not Path(root).is_dir():
        return []
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expected(cfg) -> dict[str, dict]:
    """{fingerprint file under data/inputs/: its content} for this recipe, checked now."""
    from laionbuild.metadata.sources import image_embeddings_url, input_urls, source_listing, source_url
    from laionbuild.models.clip import checkpoint_path

    s = cfg.source
    groups: dict[str, list[str]] = {}
    extra: dict[str, dict] = {}
    # source.files: the folder is listed once (not once per part: 1,112 listings at 1,112 parts),
    # and where the listing says what a HEAD would (S3's ETag, HF's blob id), no HEAD is sent
    listing = source_listing(cfg) if s.files else {}
    listed = {u: fp for u, info in listing.items() if is_remote(u) and (fp := _listed_fingerprint(info))}
    if s.consolidate_parts:  # fetch@N then reads data/consolidated, which DVC tracks
        groups["consolidate.json"] = list(listing) if s.files else input_urls(cfg)
        for part in cfg.subset.parts:
            groups[f"source/part_{part}.json"] = []
    else:
        groups["consolidate.json"] = []
        files = list(listing) if s.files else None
        for part in cfg.subset.parts:
            groups[f"source/part_{part}.json"] = [u for u in (source_url(cfg, part, files),
                                                              image_embeddings_url(cfg, part, files)) if u]
    groups["ids.json"] = [s.ids_url] if s.ids_url else []
    words = cfg.prepare.caption_word_list
    groups["word_list.json"] = [words if is_remote(words) else str(Path(words).expanduser())] if words else []
    language = cfg.prepare.language_model
    groups["language.json"] = [str(Path(language).expanduser())] if language else []
    groups["local_server.json"] = _local_server_files(cfg)
    extra["faces.json"], groups["faces.json"] = _faces(cfg)
    weights = cfg.tag.watermark.weights
    groups["watermark.json"] = [str(Path(weights).expanduser())] if weights else []
    models = [cfg.embed.pretrained] if not cfg.embed.from_source else []
    models += [spec.pretrained for spec in cfg.embed.extra_models.values()]
    groups["models.json"] = [str(p) for p in map(checkpoint_path, models) if p is not None]
    if cfg.embed.text_model and not cfg.embed.from_source:  # every file of the text encoder's folder
        from laionbuild.models.text_encoders import files as text_model_files

        groups["models.json"] += text_model_files(cfg.embed.text_model)
    groups["heads.json"] = [str(Path(head.path).expanduser()) for head in cfg.tag.heads.values()]
    # the safety lists (docs/safety.md): prepare.blocklists, tag.unsafe_keywords
    groups["blocklists.json"] = [entry.path for entry in cfg.prepare.blocklists]
    groups["image_blocklists.json"] = [entry.path for entry in cfg.select.image_blocklists]
    keywords = cfg.tag.unsafe_keywords
    groups["keywords.json"] = [keywords] if keywords else []
    clusters = cfg.tag.clusters
    named = ([clusters.centroids] if clusters.centroids else []) + list(clusters.targets)
    groups["clusters.json"] = [u if is_remote(u) else str(Path(u).expanduser()) for u in named] if clusters.enabled else []
    found = listed | _fingerprints([u for urls in groups.values() for u in urls if u not in listed])
    blind = [u for u, fp in found.items() if not fp]
    if blind:
        log.warning("%d input files: the store says nothing about their content (no size, ETag, modification time "
                    "or checksum), e.g. %s: a new version is not seen, so what reads it is not rebuilt; serve them "
                    "from a store that says so, or from a local path", len(blind), blind[0])
    files = {name: {**extra.get(name, {}), "inputs": {u: found[u] for u in urls}} for name, urls in groups.items()}
    return {name: _settled(name, content) for name, content in files.items()}


def _settled(name: str, content: dict) -> dict:
    """`content` with each file's fingerprint as last recorded where the new one says the same
    with fewer keys (a folder listing instead of a HEAD: S3's listing has no VersionId), so a
    change of how a file is checked does not refetch what did not change."""
    old = recorded_inputs(name)
    inputs = dict(content["inputs"])
    for url, new in inputs.items():
        before = old.get(url)
        if before and new and new != before and "missing" not in new and all(before.get(k) == v for k, v in new.items()):
            inputs[url] = before
    return {**content, "inputs": inputs}


def _text(content: dict) -> str:
    return json.dumps(content, indent=1, sort_keys=True) + "\n"


def recorded(name: str) -> dict | None:
    """The content of data/inputs/NAME as the last check wrote it (None: never checked)."""
    try:
        return json.loads((INPUTS / name).read_text())
    except (OSError, ValueError):
        return None


def recorded_inputs(name: str) -> dict[str, dict]:
    """Each file's fingerprint in data/inputs/NAME as the last check wrote it ({}: never checked)."""
    return (recorded(name) or {}).get("inputs") or {}


def write(cfg) -> tuple[list[str], int]:
    """Check every input; rewrite the fingerprint files whose content changed (only those, so
    the others keep their md5) and drop those of parts no longer built. Returns (the files
    rewritten, how many inputs were checked)."""
    files = expected(cfg)
    changed = []
    for name, content in files.items():
        path = INPUTS / name
        text = _text(content)
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
            changed.append(name)
    for path in sorted((INPUTS / "source").glob("part_*.json")):
        if f"source/{path.name}" not in files:
            path.unlink()
    return changed, sum(len(c["inputs"]) for c in files.values())


def consumers(name: str, parts: list[int]) -> list[str]:
    """The stages (as DVC names them) that depend on data/inputs/NAME (dvc.yaml's deps)."""
    if m := _PART_FILE.match(name):
        return [f"fetch@{m.group(1)}"]
    if name == "consolidate.json":
        return ["consolidate"]
    if name == "clusters.json":
        return ["clusters"]
    stage = {"ids.json": "prepare", "local_server.json": "download", "faces.json": "faces", "watermark.json": "watermark",
             "models.json": "embed", "heads.json": "tag", "blocklists.json": "prepare",
             "word_list.json": "prepare", "language.json": "prepare",
             "image_blocklists.json": "screen", "keywords.json": "tag"}[name]
    return [f"{stage}@{p}" for p in parts] + (["card"] if name in ("blocklists.json", "image_blocklists.json",
                                                                   "keywords.json") else [])


def changes(old: dict | None, new: dict) -> list[str]:
    """What differs between two contents of one fingerprint file: the files (paths or URLs)
    added, removed or changed, and `detector` when the face detector resolves otherwise."""
    old = old or {}
    before, after = old.get("inputs", {}), new.get("inputs", {})
    names = [u for u in sorted(set(before) | set(after)) if before.get(u) != after.get(u)]
    return names + [k for k in sorted((set(old) | set(new)) - {"inputs"}) if old.get(k) != new.get(k)]


def pending(cfg, files: dict[str, dict] | None = None) -> dict[str, list[str]]:
    """{stage: the files changed since the last check} for the files the `inputs` stage has not
    seen change yet (checked now, or `files` as `expected` gave them; nothing written): what
    `laionbuild status` shows as stale."""
    stale: dict[str, list[str]] = {}
    for name, content in (expected(cfg) if files is None else files).items():
        old = recorded(name)
        if old is not None and old == content:
            continue
        names = changes(old, content) if old is not None else [f"data/inputs/{name} (not checked yet)"]
        for stage in consumers(name, list(cfg.subset.parts)):
            stale.setdefault(stage, []).extend(names)
    return stale

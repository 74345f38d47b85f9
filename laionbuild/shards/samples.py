"""The selected samples of a build as the dataset's shards hold them, read straight from the
download's shards: what `assemble` writes into `data/dataset` and what `laionbuild.read` gives a
user before (or instead of) materialising a sweep point.

A sample is webdataset's dict: `__key__` (our key), the image under its extension (`jpg`, `png`
or `webp`, img2dataset's bytes as they are, never re-encoded), `txt` (the caption) and `json`
(key, part, url, caption and tags, keys sorted), byte for byte the members `assemble` writes.
Order is dataset order: `subset.parts` order, then key order within a part (img2dataset stores
samples in completion order; the part's selected keys give the order back).

Cost: one sequential read of each download shard of a part that has a selected sample (its
headers and `.json` members first, then the selected images in file order, `part_samples`; a
shard under `download.shards_url` is copied once to `data/.tmp` for the part's duration, not
read by ranged requests per image), one pass over the part's tags and deduplicated metadata;
image bytes are copied as they are (never decoded or re-encoded); memory is one part's member
index (~200 bytes per sample: 1M-row parts ≈ 200 MB) and up to READ_AHEAD_BYTES of images.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from laionbuild.project.layout import KEY_COLUMN, SELECTED, TMP, part_dir
from laionbuild.project.outputs import selected_keys
from laionbuild.shards.storage import filesystem, is_url, open_binary, part_shards

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
ROW_COLUMNS_SKIP = {"key", "part", "url", "caption"}  # the others of a part's rows are its tags


@contextmanager
def downloaded_images(part: int, root: Path = Path(".")) -> Iterator[dict[str, tuple]]:
    """key -> (open tar, image member, extension) over a part's img2dataset shards."""
    with ExitStack() as stack:
        found: dict[str, tuple] = {}
        local = None
        for shard in part_shards(root / part_dir("download", part)):
            path = shard.location
            if is_url(path):  # under download.shards_url: one sequential read of each tar into a
                # local copy (for the part's duration), not a ranged request per image
                if local is None:
                    tmp = root / TMP
                    tmp.mkdir(parents=True, exist_ok=True)
                    local = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=tmp)))
                path = str(local / f"{shard.name}.tar")
                fs, remote = filesystem(shard.location)
                fs.get(remote, path)
            elif not Path(path).is_absolute():
                path = str(root / path)
            tar = stack.enter_context(tarfile.open(path))
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                members.setdefault(stem, {})[ext] = member
            for files in members.values():
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
                if image_ext is None or "json" not in files:
                    continue
                key = json.loads(tar.extractfile(files["json"]).read())[KEY_COLUMN]
                found[key] = (tar, files[image_ext], image_ext)
        yield found


def part_rows(part: int, keys: list[str], root: Path = Path(".")) -> pd.DataFrame:
    """The selected rows of a part with url, caption and tags, in `keys` order (vectorised)."""
    prepared = pq.read_table(root / part_dir("dedup", part) / "metadata.parquet", columns=["key", "url", "caption"])
    tags = pq.read_table(root / part_dir("tag", part) / "tags.parquet").drop_columns(["part"])
    frame = pd.DataFrame({"key": keys}).merge(prepared.to_pandas(), on="key", how="left")
    frame = frame.merge(tags.to_pandas(), on="key", how="left")
    frame.insert(1, "part", part)
    return frame


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


# bytes of images read ahead, in file order, before they are given out in key order
READ_AHEAD_BYTES = 256 << 20


def _batches(keys: list[str], images: dict[str, tuple], limit: int) -> Iterator[tuple[int, int]]:
    """(start, end) runs of consecutive `keys` whose images add up to at most `limit` bytes (a
    larger image alone)."""
    start = 0
    while start < len(keys):
        end, size = start + 1, images[keys[start]][1].size
        while end < len(keys) and size + images[keys[end]][1].size <= limit:
            size += images[keys[end]][1].size
            end += 1
        yield start, end
        start = end


def part_samples(part: int, frame: pd.DataFrame, root: Path = Path("."),
                 read_ahead: int = READ_AHEAD_BYTES) -> Iterator[dict]:
    """The webdataset samples of a part's selected rows (`part_rows`), in their order. Images
    are read in file order (shard, then offset within it), `read_ahead` bytes at a time, and
    given out in key order: img2dataset writes a shard's samples in completion order (its
    threads' jitter), but each shard holds a contiguous run of the part's keys, so a run of keys
    is a forward read through one shard, and the part is one sequential pass per download shard:
    never a seek back within a read-ahead window, and between two windows at most a step back
    of the threads' jitter (a few samples); memory: up to `read_ahead` of images."""
    tag_names = [c for c in frame.columns if c not in ROW_COLUMNS_SKIP]
    records = frame.to_dict("records")
    keys = [r["key"] for r in records]
    with downloaded_images(part, root) as images:
        shard_of = {id(tar): i for i, tar in enumerate(dict.fromkeys(t for t, _, _ in images.values()))}
        for start, end in _batches(keys, images, read_ahead):
            wanted = sorted(range(start, end), key=lambda i: (shard_of[id(images[keys[i]][0])],
                                                               images[keys[i]][1].offset_data))
            data = {}
            for i in wanted:
                tar, member, _ = images[keys[i]]
                data[i] = tar.extractfile(member).read()
            for i in range(start, end):
                record, key = records[i], keys[i]
                meta = {"key": key, "part": part, "url": record["url"], "caption": record["caption"],
                        "tags": {c: _plain(record[c]) for c in tag_names}}
                yield {"__key__": key, images[key][2]: data.pop(i), "txt": record["caption"].encode(),
                       "json": json.dumps(meta, sort_keys=True).encode()}


def selected_samples(parts: list[int], root: Path = Path(".")) -> Iterator[dict]:
    """Every selected sample of the build at `root` (data/selected as it is now), in dataset
    order, straight from the download's shards."""
    selected = pq.ParquetFile(root / SELECTED / "selected.parquet")
    for part in parts:
        keys = selected_keys(selected, part)
        if keys:
            yield from part_samples(part, part_rows(part, keys, root), root)


def shard_images(location: str) -> list[tuple[str, bytes]]:
    """(our key, image bytes) of every sample of one img2dataset shard (a local path or URL) that
    has an image and its `.json`, sorted by member stem; the tar is read once, sequentially. For the
    stages that tag the pixels of a part shard by shard."""
    samples: dict[str, dict[str, bytes]] = {}
    with open_binary(location) as f, tarfile.open(fileobj=f) as tar:
        for member in tar.getmembers():
            if member.isfile():
                stem, _, ext = member.name.partition(".")
                samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    out = []
    for stem in sorted(samples):
        sample = samples[stem]
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is not None and "json" in sample:
            out.append((str(json.loads(sample["json"])[KEY_COLUMN]), image))
    return out

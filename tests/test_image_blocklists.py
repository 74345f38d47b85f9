"""select.image_blocklists (the `screen` stage, laionbuild/metadata/blocklists.py): a list of
image MD5s drops exactly the downloaded samples whose fetched bytes hash to a listed digest
(computed here with hashlib from the bytes the loopback server sends) from the selection, the
dataset shards, the embeddings, the index, the export and the report's grids, each list counted
in the funnel, the report and the card as a number only; a new version of a list reruns the
screen and what follows through real DVC, never the download; a list the build cannot match is
refused at compose."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import compose
from laionbuild.shards.thumbs import data_uri, thumbnail

from .conftest import ROOT
from .imageserver import ImageServer, make_image, source_overrides, write_source

ROWS = 30
MISSING_EVERY = 7  # /missing/ URLs: failed downloads, no hash
AFTER_SELECT = ["select", "assemble", "export", "index", "report", "card"]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def served(i: int) -> bytes | None:
    """The bytes the server sends for row i (None: a 404)."""
    return None if i % MISSING_EVERY == 0 else make_image(i)


def key(i: int) -> str:
    return f"{0:05d}{i:09d}"


def dataset_members(project) -> dict[str, dict[str, bytes]]:
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted((project / "data/dataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                members.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    return members


def download_images(project) -> dict[str, bytes]:
    """Our key -> the image bytes img2dataset stored, from the download's shards (the cache)."""
    found = {}
    for shard in sorted((project / "data/images/part_0").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json"):
                    ours = json.loads(tar.extractfile(name).read())["laionbuild_key"]
                    stem = name.removesuffix(".json")
                    if f"{stem}.jpg" in names:
                        found[ours] = tar.extractfile(f"{stem}.jpg").read()
    return found


def check_outputs(project, blocked: set[int], listed: list[str], urls: dict[int, str]) -> None:
    """The build's outputs hold every downloaded sample but the `blocked` rows, anywhere."""
    downloaded = [i for i in range(ROWS) if served(i) is not None]
    kept = [key(i) for i in downloaded if i not in blocked]
    # the screen stage's matches, and the selection in build order
    screened = pq.read_table(project / "data/screened/part_0/blocked.parquet").to_pylist()
    assert screened == [{"key": key(i), "list": "iwf"} for i in sorted(blocked)]
    assert pq.read_table(project / "data/selected/selected.parquet").column("key").to_pylist() == kept
    # the dataset's shards: no member of a blocked sample, nor its URL in any metadata
    members = dataset_members(project)
    assert sorted(members) == kept
    shard_meta = pa.concat_tables([pq.read_table(p) for p in sorted((project / "data/dataset").glob("*.parquet"))])
    assert set(shard_meta.column("key").to_pylist()) == set(kept)
    assert not {urls[i] for i in blocked} & set(shard_meta.column("url").to_pylist())
    # the embeddings: the kept rows of embed's output, in dataset order
    embed_keys = pq.read_table(project / "data/embed/part_0/metadata/metadata_0.parquet").column(
        "laionbuild_key").to_pylist()
    embed = np.load(project / "data/embed/part_0/img_emb/img_emb_0.npy")
    emb_keys = pq.read_table(project / "data/embeddings/metadata").column("key").to_pylist()
    assert emb_keys == kept
    got = np.concatenate([np.load(f) for f in sorted((project / "data/embeddings/img_emb").glob("*.npy"))])
    np.testing.assert_array_equal(got, embed[[embed_keys.index(k) for k in kept]])
    # the index: exactly the kept embeddings (ids are rows of data/embeddings)
    index = faiss.read_index(str(project / "data/index/image.index"))
    assert index.ntotal == len(kept)
    _, ids = index.search(got.astype(np.float32), 1)
    assert ids[:, 0].tolist() == list(range(len(kept)))
    # the report: per-list counts only; no blocked key, URL, listed hash or thumbnail
    funnel = json.loads((project / "data/metrics/funnel.json").read_text())
    assert funnel["image_blocklist_matches"] == {"iwf": len(blocked)}
    assert funnel["embedded"] - funnel["after_image_blocklist_iwf"] == len(blocked)
    assert funnel["selected"] == funnel["indexed"] == len(kept)
    html = (project / "data/report/index.html").read_text()
    assert "image hash list: iwf" in html
    images = download_images(project)
    assert set(images) == {key(i) for i in downloaded}  # (the download's cache keeps them: docs/safety.md)
    for i in blocked:
        assert key(i) not in html and urls[i] not in html and md5(served(i)) not in html
        assert data_uri(thumbnail(images[key(i)], 96)) not in html
    assert sum(data_uri(thumbnail(images[k], 96)) in html for k in kept) > 0  # (the grids do show kept ones)
    assert not any(h in html for h in listed)
    # the card: the list with its content hash and its count, never what it matched
    card_md = (project / "data/card.md").read_text()
    card = json.loads((project / "data/card.json").read_text())
    entry = next(s for s in card["safety_lists"] if s["name"] == "iwf")
    assert entry["use"] == "select.image_blocklists (image_md5)" and entry["matched"] == len(blocked)
    assert entry["content"]["md5"] == md5((project.path.parent / "lists" / "iwf_md5.txt.gz").read_bytes())
    for text in (card_md, json.dumps(card)):
        assert not any(h in text for h in listed)
        assert not any(urls[i] in text or key(i) in text for i in blocked)


def test_an_image_md5_list_drops_the_samples_everywhere_and_a_new_version_reruns_only_the_screen(project, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    listed_rows = [3, 10, 17, 14]  # 14: a /missing/ URL, never downloaded: nothing to match
    noise = [md5(f"not an image {i}".encode()) for i in range(40)]
    listed = [md5(make_image(i)) for i in listed_rows] + noise

    def write_list(entries: list[str]) -> None:  # upper case and spaces: trimmed, any case
        with gzip.open(lists / "iwf_md5.txt.gz", "wt") as f:
            f.write("\n".join(f" {h.upper()} " if n % 2 else h for n, h in enumerate(entries)) + "\n")

    write_list(listed)
    with ImageServer() as server:
        write_source(tmp_path / "source", server.url, ROWS, missing_every=MISSING_EVERY)
        urls = {i: u for i, u in enumerate(pq.read_table(tmp_path / "source" / "part-00000.parquet")
                                           .column("URL").to_pylist())}
        recipe = [*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                  "download.compute_hash=md5", "download.number_sample_per_shard=8", "select.min_clip_similarity=null",
                  f"select.image_blocklists=[{{name: iwf, path: '{lists / 'iwf_md5.txt.gz'}', match: image_md5}}]"]
        first = project.build(*recipe)
        assert {"download@0", "screen@0", *AFTER_SELECT} <= set(first.ran)
        blocked = {i for i in listed_rows if served(i) is not None}
        assert blocked == {3, 10, 17}
        check_outputs(project, blocked, listed, urls)
        requests = sum(server.requests.values())

        # a new version of the list (one more hash, of a kept sample): the screen and what follows
        # rerun, never the download, the embeddings or the tags
        more = listed + [md5(make_image(5))]
        write_list(more)
        assert project.status_reasons()["screen@0"] == ("stale", f"file: {lists / 'iwf_md5.txt.gz'}")
        again = project.build(*recipe)
        assert sorted(again.ran) == sorted(["screen@0", *AFTER_SELECT])
        check_outputs(project, blocked | {5}, more, urls)
        # a version that matches nothing more: the screen reruns, its output is the same, and only
        # the card (which prints the list's content hash) follows
        write_list(more + [md5(b"yet another")])
        assert sorted(project.build(*recipe).ran) == ["card", "screen@0"]
        assert sum(server.requests.values()) == requests  # nothing downloaded again


def test_lists_the_build_cannot_match_are_refused_at_compose():
    def refused(*overrides, recipe="laion400m") -> str:
        with pytest.raises(LaionbuildError) as info:
            compose([f"recipe={recipe}", *overrides], conf_dir=ROOT / "conf")
        message = str(info.value)
        assert "\n" not in message
        return message

    md5_list = "select.image_blocklists=[{name: iwf, path: /lists/iwf.txt, match: image_md5}]"
    # the default download.compute_hash is sha256: an md5 list cannot be matched
    message = refused(md5_list)
    assert "`select.image_blocklists.0.match`" in message and "set download.compute_hash=md5" in message
    assert "computes none" in refused(md5_list, "download.compute_hash=null")
    assert "computes sha512" in refused(md5_list, "download.compute_hash=sha512")
    assert "img2dataset computes no SHA-1" in refused(
        "select.image_blocklists=[{name: sio, path: /lists/sio.txt, match: image_sha1}]")
    # an embeddings-only build downloads no image
    assert "download.enabled=false downloads none" in refused(md5_list, "download.compute_hash=md5",
                                                              recipe="laion2b_en_emb")
    assert "cannot tell the format of a `.json` file" in refused(
        "select.image_blocklists=[{name: iwf, path: /l/x.json, match: image_sha256}]")
    assert "`select.image_blocklists.1.name`" in refused(
        "select.image_blocklists=[{name: a, path: /l/x.txt, match: image_sha256}, "
        "{name: a, path: /l/y.txt, match: image_sha256}]")
    assert "select.image_blocklists.0.path=/lists/iwf.txt" in refused(
        "select.image_blocklists=[{name: iwf, path: '???', match: image_sha256}]")
    # prepare.blocklists takes no image hash: it points at the key that does
    assert "move it to select.image_blocklists" in refused(
        "prepare.blocklists=[{name: iwf, path: /lists/iwf.txt, match: image_md5}]")
    # what the build computes, it matches
    for match, algorithm in (("image_md5", "md5"), ("image_sha256", "sha256"), ("image_sha512", "sha512")):
        cfg = compose(["recipe=laion400m", f"download.compute_hash={algorithm}",
                       f"select.image_blocklists=[{{name: x, path: /l/x.txt, match: {match}}}]"],
                      conf_dir=ROOT / "conf")
        assert [e.match for e in cfg.select.image_blocklists] == [match]


def test_a_list_of_the_wrong_digests_fails_the_screen_naming_its_file(project, tmp_path):
    """A sha256 list labelled image_md5 would silently match nothing: the screen refuses it."""
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "wrong.txt").write_text(hashlib.sha256(make_image(1)).hexdigest() + "\n")
    with ImageServer() as server:
        write_source(tmp_path / "source", server.url, 6)
        with pytest.raises(LaionbuildError) as info:
            project.build_in_process(
                *source_overrides(tmp_path / "source"), "download.allow_private_urls=true", "download.compute_hash=md5",
                f"select.image_blocklists=[{{name: iwf, path: '{lists / 'wrong.txt'}', match: image_md5}}]",
                until="screen")
    message = str(info.value)
    assert str(lists / "wrong.txt") in message and "not a 32-digit hex digest as match=image_md5 needs" in message
    assert not (project / "data/screened/part_0").exists()


def test_screen_reads_the_hash_column_img2dataset_writes(project, tmp_path):
    """The column the screen matches is the one img2dataset 1.47 writes for download.compute_hash
    (named after the algorithm, the digest of the bytes as fetched)."""
    with ImageServer() as server:
        write_source(tmp_path / "source", server.url, 4)
        project.build_in_process(*source_overrides(tmp_path / "source"), "download.allow_private_urls=true",
                                 "download.compute_hash=sha512", until="download")
    table = pq.read_table(next((project / "data/images/part_0").glob("*.parquet")))
    rows = {r["laionbuild_key"]: r["sha512"] for r in table.to_pylist()}
    assert rows == {key(i): hashlib.sha512(make_image(i)).hexdigest() for i in range(4)}

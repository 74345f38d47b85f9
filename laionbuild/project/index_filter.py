"""The index of an unmaterialised build (`assemble.materialize=false`, a sweep point) and its
selection as a faiss id filter.

Such a build's `index` stage indexes **every embedded sample** once (data/embed of every part,
in build order: part order, then key order), not the selection: its inputs do not change between
sweep points, so DVC skips it (or restores it from its run-cache) at every point after the first.
`data/index/parts.json` says which ids each part's rows have (`first_id`, `count`), and
`data/index/metadata/metadata_NNNNNN.parquet` (one per part with embedded rows, row i = id i over
the files in name order, clip-retrieval back's layout) holds their key, url, caption and tags.

A point's selection (`data/selected/selected.parquet`) becomes the sorted index ids of its
selected samples (`selected_ids`: per part, the part's selected keys looked up in its index keys,
both in key order; memory one part's keys at a time), then a faiss `IDSelectorBitmap` (one bit
per indexed vector: 50 MB at 400M, a constant-time test; a `IDSelectorBatch` hash set would cost
~20-40 bytes per *selected* id, 4-8 GB for 200M) passed to the search as search parameters of the
index's type (`search_parameters`: IVF keeps its nprobe/max_codes, HNSW its efSearch,
pre-transforms such as OPQ wrap the inner index's). Every hit is a selected sample. Built once per
process (`serve` at start, `query` per call, the report once); a search then costs what an
unfiltered one does, plus the filter's test per scanned vector. An IVF index scans `nprobe` lists
whatever the filter keeps, so a small selection can return fewer than k hits and a lower recall
than the unfiltered index: the report measures it (`data/metrics/index_filtered.json`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from laionbuild.project.atomic import read_json
from laionbuild.project.files import numbered
from laionbuild.project.layout import INDEX, SELECTED, embed_dir, embeddings_dir
from laionbuild.recipe.errors import InputError

PARTS_FILE = "parts.json"  # data/index/ of an unmaterialised build: [{part, first_id, count}] in id order


def all_samples_index(root: Path = Path(".")) -> bool:
    """Whether data/index indexes every embedded sample (an unmaterialised build's index)."""
    return (root / INDEX / PARTS_FILE).exists()


def embedded_parts(parts, model: str | None = None) -> list[dict]:
    """[{part, first_id, count}] of the parts with embedded rows, in build order: the ids an
    index over every embedded sample gives their rows (reads each part's .npy header only)."""
    out, start = [], 0
    for part in parts:
        count = len(np.load(embed_dir(part, model) / "img_emb" / "img_emb_0.npy", mmap_mode="r"))
        if count:
            out.append({"part": part, "first_id": start, "count": count})
            start += count
    return out


def embedding_files(kind: str, model: str | None = None, root: Path = Path(".")) -> list[Path]:
    """The files of one kind (img_emb, text_emb) of the vectors data/index holds, in id order:
    data/embeddings' for a materialised build, each indexed part's data/embed file otherwise ([]
    when a part has none of that kind: embeddings taken from the source have no text)."""
    if (root / INDEX / PARTS_FILE).exists():
        files = [root / embed_dir(p["part"], model) / kind / f"{kind}_0.npy" for p in read_json(root / INDEX / PARTS_FILE)]
        return files if all(f.exists() for f in files) else []
    return numbered(root / embeddings_dir(model) / kind, kind, ".npy")


def rows(kind: str, wanted: np.ndarray, model: str | None = None, root: Path = Path(".")) -> np.ndarray:
    """Rows `wanted` (sorted index ids) of the indexed vectors of `kind`, as float32, reading
    only those rows of each file (memory-mapped)."""
    found, start = [], 0
    for path in embedding_files(kind, model, root):
        array = np.load(path, mmap_mode="r")
        mine = wanted[(wanted >= start) & (wanted < start + len(array))] - start
        if len(mine):
            found.append(np.asarray(array[mine], np.float32))
        start += len(array)
    return np.concatenate(found) if found else np.zeros((0, 0), np.float32)


def selected_ids(root: Path = Path(".")) -> np.ndarray:
    """The sorted index ids of the selected samples (data/selected) in an all-samples index: per
    part, its selected keys (the row groups of selected.parquet that can hold the part) looked up
    in the part's index keys, both in key order (embed sorts each part by key). Keys are compared
    as int64 (a key is 14 digits: part + source row), so memory is one part's keys at 8 bytes
    each. Measured (a 1M-row part, 500k selected, 2 shared cores): 0.14-0.2 s warm (0.7 s for
    the first, imports included), so ~1-1.5 min over LAION-400M's ~400 parts."""
    selected = pq.ParquetFile(root / SELECTED / "selected.parquet")
    files = numbered(root / INDEX / "metadata", "metadata", ".parquet")
    parts = read_json(root / INDEX / PARTS_FILE)
    if len(files) != len(parts):
        raise InputError(f"{root / INDEX}: {len(files)} metadata files for {len(parts)} indexed parts (parts.json); "
                         "rebuild the index (`laionbuild build`)")
    outside = sorted(set(selected_parts(selected)) - {entry["part"] for entry in parts})
    if outside:
        raise InputError(f"{root / INDEX}: the selection has samples of part {outside[0]}, which the index does not "
                         "hold (built for other subset.parts?); rebuild the index (`laionbuild build`)")
    ids = []
    for entry, path in zip(parts, files):
        wanted = _selected_of_part(selected, entry["part"])
        if not len(wanted):
            continue
        indexed = _keys(pq.read_table(path, columns=["key"]).column("key"))
        at = np.searchsorted(indexed, wanted)
        found = (at < len(indexed)) & (indexed[np.minimum(at, len(indexed) - 1)] == wanted)
        if not found.all():
            raise InputError(f"{root / INDEX}: {int((~found).sum())} selected samples of part {entry['part']} are not "
                             f"indexed (e.g. {wanted[~found][0]}); rebuild the index (`laionbuild build`)")
        ids.append(entry["first_id"] + at)
    return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)


def selected_parts(selected: pq.ParquetFile) -> list[int]:
    """The parts a selection has samples of, from its row groups' statistics where they say."""
    import pyarrow.compute as pc

    index = selected.schema_arrow.get_field_index("part")
    found: set[int] = set()
    for i in range(selected.num_row_groups):
        stats = selected.metadata.row_group(i).column(index).statistics
        if stats is not None and stats.has_min_max and stats.min == stats.max:
            found.add(int(stats.min))
        else:
            found.update(int(p) for p in pc.unique(selected.read_row_group(i, columns=["part"]).column("part")).to_pylist())
    return sorted(found)


def _keys(column) -> np.ndarray:
    """Keys as sortable numbers: int64 (14 digits), or strings if a key is not all digits."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.asarray(column.to_pylist(), dtype=str)


def _selected_of_part(selected: pq.ParquetFile, part: int) -> np.ndarray:
    """A part's selected keys in build order (`outputs.selected_keys`, kept columnar)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    part_index = selected.schema_arrow.get_field_index("part")
    chunks = []
    for i in range(selected.num_row_groups):
        stats = selected.metadata.row_group(i).column(part_index).statistics
        if stats is not None and stats.has_min_max and not stats.min <= part <= stats.max:
            continue
        group = selected.read_row_group(i, columns=["key", "part"])
        chunks.append(group.filter(pc.equal(group.column("part"), part)).column("key"))
    keys = pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=pa.string()) if chunks else None
    return _keys(keys) if keys is not None and len(keys) else np.zeros(0, np.int64)


class SelectionFilter:
    """The selected ids of an all-samples index as a faiss selector (a bitmap over the index's
    ids) and the search parameters that apply it; kept alive together (faiss holds pointers)."""

    def __init__(self, index, ids: np.ndarray):
        import faiss

        self.ids = np.asarray(ids, np.int64)
        mask = np.zeros(index.ntotal, bool)  # (transient: 1 byte a vector, 400 MB at 400M)
        mask[self.ids] = True
        self.bitmap = np.packbits(mask, bitorder="little")  # faiss: bit (i & 7) of byte i >> 3
        self.selector = faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))  # (n: bytes)
        self._kept: list = []
        self.params = search_parameters(index, self.selector, self._kept)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, row: int) -> bool:
        return 0 <= row < len(self.bitmap) * 8 and bool(self.bitmap[row >> 3] >> (row & 7) & 1)


def search_parameters(index, selector, kept: list):
    """faiss search parameters that filter `index`'s results by `selector` and otherwise search as
    the index is set up (autofaiss sets nprobe / efSearch on the index it saves; a parameter object
    left at its defaults would search with nprobe=1 or efSearch=16 instead). `kept` holds the
    nested objects faiss only points to."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):  # OPQ/PCA + the inner index: its parameters
        inner = search_parameters(index.index, selector, kept)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe, params.max_codes = index.nprobe, index.max_codes
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = index.hnsw.efSearch
        params.check_relative_distance = index.hnsw.check_relative_distance
    elif isinstance(index, (faiss.IndexFlat, faiss.IndexPQ, faiss.IndexScalarQuantizer)):
        params = faiss.SearchParameters()
    else:
        raise InputError(f"{INDEX / 'image.index'}: a {type(index).__name__} (autofaiss index.index_key) cannot be "
                         "searched with the selection as a filter; choose an IVF, HNSW or flat index_key, or "
                         "materialise the point (`laionbuild materialize`)")
    params.sel = selector
    kept.append(params)
    return params


def filtered_report(cfg, queries: int, seed: int, root: Path = Path(".")) -> dict:
    """The all-samples index searched under the selection filter, measured as the index stage
    measures an index: `queries` selected samples' text embeddings (image when the build has no
    text), recall@1 / recall@10 against an exact inner-product search over the selected
    embeddings only, p50/p99 latency of one filtered query at a time, and the share of queries
    that got fewer than 10 hits (an IVF index scans nprobe lists whatever the filter keeps).
    Cost: the selected ids (one pass over data/selected and the index's key column), one read
    of the selected embeddings (memory-mapped, a part at a time), `queries` searches."""
    import faiss

    model = cfg.index.model
    index = faiss.read_index(str(root / INDEX / "image.index"))
    ids = selected_ids(root)
    chosen = SelectionFilter(index, ids)
    kind = "text_emb" if embedding_files("text_emb", model, root) else "img_emb"
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(ids, size=min(queries, len(ids)), replace=False)) if len(ids) else ids
    q = np.ascontiguousarray(rows(kind, picked, model, root)) if len(picked) else np.zeros((0, index.d), np.float32)
    k = min(10, len(ids))
    result = {"filtered": True, "vectors": int(index.ntotal), "selected": len(ids), "queries": len(q),
              "query_kind": kind.split("_")[0], "selector_bytes": int(chosen.bitmap.nbytes)}
    if len(q) and k:
        truth = exact_search_within(q, k, ids, model, root)
        _, found = index.search(q, k, params=chosen.params)
        result["recall_at_1"] = float(np.mean(found[:, 0] == truth[:, 0]))
        result["recall_at_10"] = float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))
        result["short_results"] = float(np.mean((found < 0).any(axis=1)))
        result["outside_selection"] = int(sum(int(r) not in chosen for r in found[found >= 0].ravel()))
        latencies = []
        for row in q:
            start = time.perf_counter()
            index.search(row[None, :], k, params=chosen.params)
            latencies.append((time.perf_counter() - start) * 1000)
        result["latency_ms_p50"] = float(np.percentile(latencies, 50))
        result["latency_ms_p99"] = float(np.percentile(latencies, 99))
    return result


def exact_search_within(queries: np.ndarray, k: int, ids: np.ndarray, model: str | None = None,
                        root: Path = Path("."), chunk: int = 262_144) -> np.ndarray:
    """Exact inner-product top k of `queries` over the image embeddings of the index ids `ids`
    (sorted) only, as index ids: one pass over the indexed files, a chunk of a file's selected
    rows at a time, each chunk's top k by faiss's brute-force knn (BLAS, all cores), merged with
    the best so far (2k candidates a query): memory one chunk and its k per query, not a
    queries x chunk score matrix."""
    import faiss

    best_d = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    queries = np.ascontiguousarray(queries, np.float32)
    start = 0
    for path in embedding_files("img_emb", model, root):
        array = np.load(path, mmap_mode="r")
        mine = ids[(ids >= start) & (ids < start + len(array))]
        for offset in range(0, len(mine), chunk):
            block_ids = mine[offset:offset + chunk]
            block = np.ascontiguousarray(array[block_ids - start], np.float32)
            top = min(k, len(block_ids))
            block_d, local = faiss.knn(queries, block, top, faiss.METRIC_INNER_PRODUCT)
            d = np.concatenate([best_d, block_d], axis=1)
            i = np.concatenate([best_i, block_ids[local]], axis=1)
            order = np.lexsort((i, -d), axis=1)[:, :k]
            best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        start += len(array)
    return best_i


def indexed_count(root: Path = Path(".")) -> int:
    """The funnel's `indexed`: the vectors a search of this build can return (an all-samples
    index: its selected vectors; else every vector of data/index)."""
    import faiss

    if all_samples_index(root):
        return len(selected_ids(root))
    return int(faiss.read_index(str(root / INDEX / "image.index")).ntotal)

"""export: extra formats of the selected samples in `data/export/`, streamed part by part
(memory: one part or one embeddings file, whatever the build's size):

- `emb.h5` (`export.h5`): HDF5 dataset `emb`, N x dim, `export.h5_dtype` (float16 as LAION
  and SISAP ship them), rows in dataset order (= data/embeddings);
- `metadata.tsv` (`export.tsv_columns`): a header, then one line per selected sample in the
  same order, columns taken from the prepared metadata. Fields holding tabs, newlines or quotes
  are quoted (RFC 4180 style with a tab delimiter: Python's csv and pandas read it back whole);
- `export.json`: what was written, with row counts.

On an unmaterialised point (`assemble.materialize=false`: data/embeddings holds only the marker)
it writes only the same marker (`project/outputs.UNMATERIALIZED_FILE`), the same bytes for every
point, so a sweep point caches nothing here; `laionbuild materialize` writes the files.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, write_json
from laionbuild.project.files import numbered
from laionbuild.project.layout import EXPORT, SELECTED, embeddings_dir, part_dir
from laionbuild.project.outputs import UNMATERIALIZED, UNMATERIALIZED_FILE, materialized, selected_keys
from laionbuild.recipe.errors import InputError

log = logging.getLogger(__name__)
CHUNK_ROWS = 262_144


def _embedding_files(model: str | None) -> list:
    return numbered(embeddings_dir(model) / "img_emb", "img_emb", ".npy")


def write_h5(path, dtype: str, model: str | None = None) -> int:
    import h5py

    files = [np.load(f, mmap_mode="r") for f in _embedding_files(model)]
    rows = sum(len(a) for a in files)
    dim = files[0].shape[1] if files else 0
    with h5py.File(path, "w", libver="earliest") as h5:
        dataset = h5.create_dataset("emb", shape=(rows, dim), dtype=dtype, track_times=False)
        at = 0
        for array in files:
            for start in range(0, len(array), CHUNK_ROWS):
                block = np.asarray(array[start:start + CHUNK_ROWS]).astype(dtype, copy=False)
                dataset[at:at + len(block)] = block
                at += len(block)
    return rows


def write_tsv(cfg, path) -> int:
    names = list(cfg.export.tsv_columns)
    sources = [cfg.export.tsv_columns[n] for n in names]
    selected = pq.ParquetFile(SELECTED / "selected.parquet")
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(names)
        for part in cfg.subset.parts:
            keys = selected_keys(selected, part)
            if not keys:
                continue
            metadata_path = part_dir("dedup", part) / "metadata.parquet"
            have = pq.read_schema(metadata_path).names
            missing = [f"export.tsv_columns.{n}: `{s}`" for n, s in zip(names, sources) if s not in have]
            if missing:
                raise InputError(f"{metadata_path}: no column {', '.join(missing)}; the prepared metadata has {have}")
            wanted = list(dict.fromkeys(["key", *sources]))
            frame = pq.read_table(metadata_path, columns=wanted).to_pandas()
            frame = pd.DataFrame({"key": keys}).merge(frame, on="key", how="left")
            values = frame[sources].astype(object).where(frame[sources].notna(), None)
            writer.writerows(values.itertuples(index=False, name=None))
            rows += len(frame)
    return rows


def run(cfg) -> None:
    e = cfg.export
    if not materialized():  # a sweep point: nothing to export until it is materialised
        with atomic_dir(EXPORT) as out:
            write_json(out / UNMATERIALIZED_FILE, UNMATERIALIZED)
        log.info("export: unmaterialised point (assemble.materialize=false): only %s", EXPORT / UNMATERIALIZED_FILE)
        return
    with atomic_dir(EXPORT) as out:
        written = {}
        if e.h5:
            written["emb.h5"] = {"rows": write_h5(out / "emb.h5", e.h5_dtype, e.model), "dataset": "emb", "dtype": e.h5_dtype}
        if e.tsv_columns:
            written["metadata.tsv"] = {"rows": write_tsv(cfg, out / "metadata.tsv"), "columns": list(e.tsv_columns)}
        if "emb.h5" in written and "metadata.tsv" in written and \
                written["emb.h5"]["rows"] != written["metadata.tsv"]["rows"]:
            raise RuntimeError(f"export: {written['emb.h5']['rows']} embeddings but {written['metadata.tsv']['rows']} "
                               "metadata rows; rebuild assemble")
        write_json(out / "export.json", written)
    log.info("export: %s", written or "nothing (export.h5 / export.tsv_columns are off)")

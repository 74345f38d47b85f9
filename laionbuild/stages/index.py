"""index: autofaiss builds a kNN index over the selected image embeddings
(`data/index/image.index`, loadable by `faiss.read_index`, + `image_infos.json`)."""

from __future__ import annotations

import logging
import os

from ..atomic import atomic_dir
from ..layout import EMBEDDINGS, INDEX

log = logging.getLogger(__name__)


def run(cfg) -> None:
    import faiss
    from autofaiss import build_index

    c = cfg.index
    with atomic_dir(INDEX) as out:
        build_index(
            embeddings=str(EMBEDDINGS / "img_emb"),
            index_path=str(out / "image.index"),
            index_infos_path=str(out / "image_infos.json"),
            index_key=c.index_key,
            metric_type=c.metric_type,
            max_index_memory_usage=c.max_index_memory_usage,
            current_memory_available=c.current_memory_available,
            max_index_query_time_ms=c.max_index_query_time_ms,
            nb_cores=c.nb_cores or os.cpu_count(),
            save_on_disk=True,
            verbose=logging.WARNING,
        )
        index = faiss.read_index(str(out / "image.index"))
        log.info("index: %s with %d vectors", type(index).__name__, index.ntotal)

"""report: `data/metrics/funnel.json` (DVC metrics) — counts at every step, per part and in
total, read from the stats.json every stage writes: rows in, after each filter, after dedup,
downloaded ok, failed by reason, selected, indexed."""

from __future__ import annotations

from collections import Counter

from ..atomic import read_json, write_json
from ..funnel import load_stats
from ..layout import FUNNEL, FUNNEL_STEPS, INDEX, SELECTED, part_dir

PART_STEPS = ("prepare", "dedup", "download", "faces", "embed", "tag")


def run(cfg) -> None:
    import faiss

    totals: Counter = Counter()
    failures: Counter = Counter()
    parts = {}
    for part in cfg.subset.parts:
        counts: dict = {}
        for stage in PART_STEPS:
            stats = load_stats(part_dir(stage, part))
            counts.update(stats["counts"])
            failures.update(stats.get("failures", {}))
        parts[str(part)] = counts
        totals.update(counts)
    selected = load_stats(SELECTED)
    funnel = dict(totals)
    funnel["download_failed_by_reason"] = dict(sorted(failures.items()))
    for name, value in selected["counts"].items():
        if name != "tagged":
            funnel[name] = value
    funnel["indexed"] = int(faiss.read_index(str(INDEX / "image.index")).ntotal)
    funnel["parts"] = parts
    funnel["untrained_embeddings"] = any(read_json(part_dir("embed", p) / "model.json")["untrained"]
                                         for p in cfg.subset.parts)
    write_json(FUNNEL, funnel)
    # the same funnel as a DVC plot (`dvc plots show` / `dvc plots diff` across experiments)
    flow = ("rows_in", "downloaded_ok", "embedded", "selected", "indexed")
    steps = [{"step": k, "rows": v} for k, v in funnel.items()
             if isinstance(v, int) and not isinstance(v, bool) and (k in flow or k.startswith("after_"))]
    write_json(FUNNEL_STEPS, steps)

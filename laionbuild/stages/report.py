"""report: what the build did, for tools and for people.

- `data/metrics/funnel.json` (DVC metrics): counts at every step, per part and in total, read
  from the stats.json every stage writes: rows in, after each filter, after dedup, downloaded ok,
  failed by reason, selected, indexed; `funnel_steps.json` the same steps as a DVC plot.
- `data/metrics/hist/<tag>.json` (DVC plots): histograms of the numeric tags (CLIP similarity,
  original width and height, aspect ratio, face counts and scores, score heads, near-duplicate
  similarity) over every tagged sample, with the selected ones counted per bin;
  `licences.json`: the selected samples per licence; `languages.json`: per language of the
  samples' `language` column (when the metadata has one), the tagged samples and the share kept.
- `data/report/index.html`: all of the above drawn (`laionbuild/explore/html_report.py`), and for every
  filter a grid of samples it kept and samples it dropped. Thumbnails come from the build's
  shards (`data/images`), never downloaded again. Metadata filters and dedup act before the
  download, so their dropped rows are listed (caption, url), not shown.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.engine.sql import DUCKDB
from laionbuild.explore import html_report
from laionbuild.metadata.blocklists import blocked_column
from laionbuild.metadata.language import has_language, join_language
from laionbuild.metadata.rules import metadata_rules, sql_string, tag_rules, where
from laionbuild.metadata.sources import canonical_columns, duckdb_source, effective_source, part_ids, rows_sql, source_schema
from laionbuild.project.atomic import atomic_dir, atomic_write_text, read_json, write_json
from laionbuild.project.funnel import load_stats
from laionbuild.project.index_filter import all_samples_index, filtered_report, indexed_count
from laionbuild.project.layout import (
    CLUSTERS,
    FUNNEL,
    FUNNEL_STEPS,
    HISTOGRAMS,
    INDEX_FILTERED_METRICS,
    KEY_COLUMN,
    LANGUAGES,
    LICENCES,
    NEARDUP,
    REPORT,
    SELECTED,
    part_dir,
)
from laionbuild.project.outputs import image_screened, licences, screened_files, step_order
from laionbuild.shards.thumbs import ShardImages, add_downloaded_parts, data_uri, thumbnail
from laionbuild.web.failures import classify

log = logging.getLogger(__name__)
PART_STEPS = ("prepare", "dedup", "download", "screen", "faces", "watermark", "embed", "tag")
EXAMPLES = 12           # samples per grid (kept, dropped)
THUMBNAIL = 96          # px, the longer side
SCAN_ROWS = 200_000     # metadata-filter examples come from the first rows of each part
BINS = 20
HISTOGRAM_TITLES = {"clip_similarity": "CLIP similarity (image, caption)", "width": "original width (px)",
                    "height": "original height (px)", "aspect_ratio": "aspect ratio (width / height)",
                    "face_count": "faces per image", "face_max_score": "best face score",
                    "watermark_score": "p(watermark), LAION-5B-WatermarkDetection",
                    "near_dup_similarity": "similarity to the nearest earlier sample"}
NOT_HISTOGRAMS = {"part"}


def funnel(cfg, indexed: int | None = None) -> dict:
    """`indexed`: the vectors a search returns, when known (else read from data/index)."""
    totals: Counter = Counter()
    failures: Counter = Counter()
    parts = {}
    # rows (samples) each hash list matched, per list: counts only, never what matched
    matches: dict[str, Counter] = {"blocklist_matches": Counter(), "image_blocklist_matches": Counter()}
    for part in cfg.subset.parts:
        counts: dict = {}
        for stage in PART_STEPS:
            stats = load_stats(part_dir(stage, part))
            counts.update(stats["counts"])
            failures.update(stats.get("failures", {}))
            for entry in stats.get("blocklists", []):
                matches["blocklist_matches"][entry["name"]] += entry["matched_rows"]
            for entry in stats.get("image_blocklists", []):
                matches["image_blocklist_matches"][entry["name"]] += entry["matched_samples"]
        parts[str(part)] = counts
        totals.update(counts)
    selected = load_stats(SELECTED)
    result = dict(totals)
    result["download_failed_by_reason"] = dict(sorted(failures.items()))
    result["blocklist_matches"] = {e.name: matches["blocklist_matches"][e.name] for e in cfg.prepare.blocklists}
    result["image_blocklist_matches"] = {e.name: matches["image_blocklist_matches"][e.name]
                                         for e in cfg.select.image_blocklists}
    for name, value in selected["counts"].items():
        if name != "tagged":
            result[name] = value
    result["indexed"] = indexed_count() if indexed is None else indexed
    result["parts"] = parts
    result["untrained_embeddings"] = any(read_json(part_dir("embed", p) / "model.json")["untrained"]
                                         for p in cfg.subset.parts)
    return result


def funnel_steps(cfg, result: dict) -> list[dict]:
    return [{"step": k, "rows": result[k]} for k in step_order(cfg) if isinstance(result.get(k), int)]


def run(cfg) -> None:
    # an unmaterialised point searches the all-samples index under its selection: measured here,
    # where the selection is a dependency (the index stage's own index.json does not depend on it);
    # the funnel's `indexed` is then the selected vectors the filter lets through
    filtered = (filtered_report(cfg, cfg.index.report_queries, cfg.index.report_seed) if all_samples_index()
                else {"filtered": False})
    write_json(INDEX_FILTERED_METRICS, filtered)
    result = funnel(cfg, filtered.get("selected"))
    write_json(FUNNEL, result)
    # the same funnel as a DVC plot (`dvc plots show` / `dvc plots diff` across experiments)
    steps = funnel_steps(cfg, result)
    write_json(FUNNEL_STEPS, steps)

    con = duckdb.connect()
    numeric = _tags_view(con, cfg)
    histograms = [{"name": c, "title": HISTOGRAM_TITLES.get(c, c), "bins": bins} for c in numeric
                  if (bins := _histogram(con, c))]  # a tag with no value (e.g. near-dup off) has no histogram
    with atomic_dir(HISTOGRAMS) as out:
        for hist in histograms:
            write_json(out / f"{hist['name']}.json", hist["bins"])
    licence_rows = [{"licence": k, "samples": v} for k, v in licences(cfg).items()]
    write_json(LICENCES, licence_rows)
    language_rows = _languages(con, cfg)
    write_json(LANGUAGES, language_rows)

    # a sample an image list matched is never shown: its image is not registered, and no grid
    # lists its row (nor, for dedup, a duplicate shown with its picture)
    blocked = _image_blocked(cfg)
    with ShardImages() as images:
        add_downloaded_parts(images, cfg.subset.parts, exclude=blocked)
        filters = (_prepare_sections(cfg, result, images, blocked) + _dedup_sections(cfg, images, blocked)
                   + _download_sections(cfg, result, images, blocked) + _select_sections(cfg, con, result, images))
    page = html_report.render({
        "name": cfg.recipe.name, "description": cfg.recipe.description, "parts": list(cfg.subset.parts),
        "selected": result.get("selected", 0), "indexed": result["indexed"],
        "untrained": result["untrained_embeddings"], "funnel_steps": steps,
        "failures": result["download_failed_by_reason"], "histograms": histograms, "licences": licence_rows,
        "languages": language_rows, "filters": filters})
    with atomic_dir(REPORT) as out:
        atomic_write_text(out / "index.html", page)
    log.info("report: %s (%d histograms, %d filter grids)", REPORT / "index.html", len(histograms), len(filters))


# -- tags ---------------------------------------------------------------------------------------

def _tags_view(con, cfg) -> list[str]:
    """`tags`: every part's tag table in build order (`_row`), with `aspect_ratio`, the
    near-duplicate similarity when computed, and `_selected`. Returns its numeric columns."""
    files = [str(part_dir("tag", p) / "tags.parquet") for p in cfg.subset.parts]
    source = f"read_parquet([{', '.join(sql_string(f) for f in files)}], union_by_name=true)"
    if cfg.select.image_blocklists:  # + `_image_blocked_<name>` (select's rules read them)
        source = image_screened(con, cfg, source)
    con.execute(f"CREATE TEMP VIEW tag_rows AS SELECT *, row_number() OVER () AS _row FROM {source}")
    neardup = NEARDUP / "neardup.parquet"
    join = extra = ""
    if neardup.exists() and "near_dup_similarity" in pq.read_schema(neardup).names:
        join = f" LEFT JOIN (SELECT key, near_dup_similarity FROM read_parquet({sql_string(neardup)})) n USING (key)"
        extra = ", n.near_dup_similarity"
    if cfg.select.in_target_clusters:  # the clusters stage's rule column
        join += (f" LEFT JOIN (SELECT key, in_target_cluster FROM read_parquet({sql_string(CLUSTERS / 'clusters.parquet')}))"
                 " c USING (key)")
        extra += ", c.in_target_cluster"
    columns = {name for name, in con.execute("SELECT column_name FROM (DESCRIBE tag_rows)").fetchall()}
    ratio = ", CASE WHEN height > 0 THEN width / height END AS aspect_ratio" if {"width", "height"} <= columns else ""
    con.execute(f"""CREATE TEMP VIEW tags AS SELECT t.*{extra}{ratio}, s.key IS NOT NULL AS _selected
                    FROM tag_rows t{join} LEFT JOIN read_parquet({sql_string(SELECTED / 'selected.parquet')}) s
                    USING (key) ORDER BY _row""")
    described = con.execute("SELECT column_name, column_type FROM (DESCRIBE tags)").fetchall()
    return [name for name, kind in described if not name.startswith("_") and name not in NOT_HISTOGRAMS
            and kind.split("(")[0] in ("DOUBLE", "FLOAT", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT",
                                       "UBIGINT", "UINTEGER", "DECIMAL")]


def _languages(con, cfg) -> list[dict]:
    """[{language, tagged, selected, share}]: per language of the samples' `language` column (the
    source's or prepare.languages' detection; `null`: none), the tagged samples and the share
    select kept, most tagged first. [] when the metadata has no language column."""
    if not has_language(con, cfg):
        return []
    join_language(con, cfg, "tags", "tags_by_language")
    rows = con.execute("""SELECT coalesce(language, 'null') AS l, count(*) AS n, count(*) FILTER (WHERE _selected)
                          FROM tags_by_language GROUP BY l ORDER BY n DESC, l""").fetchall()
    return [{"language": code, "tagged": n, "selected": kept, "share": round(kept / n, 6) if n else 0.0}
            for code, n, kept in rows]


def _histogram(con, column: str) -> list[dict]:
    """[{bin, bin_end, samples, selected}]: 20 equal bins over the values' range, or one bin
    per integer for an integer tag of small range."""
    col = DUCKDB.quote(column)
    valid = f"{col} IS NOT NULL AND isfinite(CAST({col} AS DOUBLE))"
    low, high, integral = con.execute(f"SELECT min({col}), max({col}), bool_and({col} = round({col})) "
                                      f"FROM tags WHERE {valid}").fetchone()
    if low is None:
        return []
    low, high = float(low), float(high)
    if integral and high - low < 50:
        width, count = 1.0, int(high - low) + 1
    else:
        count = BINS if high > low else 1
        width = (high - low) / count if high > low else 1.0
    rows = con.execute(f"""SELECT least(greatest(CAST(floor(({col} - {low!r}) / {width!r}) AS BIGINT), 0), {count - 1}) AS b,
                           count(*), count(*) FILTER (WHERE _selected) FROM tags WHERE {valid} GROUP BY b""").fetchall()
    counts = {b: (n, s) for b, n, s in rows}
    return [{"bin": round(low + i * width, 6), "bin_end": round(low + (i + 1) * width, 6),
             "samples": counts.get(i, (0, 0))[0], "selected": counts.get(i, (0, 0))[1]} for i in range(count)]


# -- examples -----------------------------------------------------------------------------------

def _image_blocked(cfg) -> pa.Table:
    """The keys of the samples an image list matched (the screen stage's), as a one-column table."""
    if not cfg.select.image_blocklists:
        return pa.table({"key": pa.array([], pa.string())})
    files = screened_files(cfg)
    return pa.concat_tables([pq.read_table(f, columns=["key"]) for f in files]).group_by("key").aggregate([])


def _not_blocked(con, blocked: pa.Table, column: str = "key") -> str:
    """A condition leaving out the rows whose `column` is an image-blocklisted key."""
    con.register("image_blocked", blocked)
    return f"{DUCKDB.quote(column)} NOT IN (SELECT key FROM image_blocked)"


def _spread(con, relation: str, condition: str, columns: str, limit: int = EXAMPLES) -> list[dict]:
    """Up to `limit` rows of `relation` meeting `condition`, evenly spaced over them in `_row`
    order (so a grid shows the whole build, not its first rows)."""
    rows = con.execute(f"""SELECT * EXCLUDE (_rn, _n) FROM (SELECT {columns}, _row, row_number() OVER (ORDER BY _row) AS _rn,
                           count(*) OVER () AS _n FROM {relation} WHERE {condition})
                           WHERE (_rn - 1) % greatest(_n // {limit}, 1) = 0 ORDER BY _row LIMIT {limit}""")
    return rows.fetch_arrow_table().to_pylist()


def _with_image(example: dict, images: ShardImages, key: str | None = None) -> dict:
    key = key or example["key"]
    example["image"] = data_uri(thumbnail(images.read(key), THUMBNAIL)) if key in images else None
    return example


def _used(predicate: str, columns) -> list[str]:
    return [c for c in columns if re.search(rf"\b{re.escape(c)}\b", predicate)]


def _note(row: dict, names: list[str]) -> str:
    def show(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{n}={show(row[n])}" for n in names if n in row)


def _prepare_sections(cfg, result: dict, images: ShardImages, blocked: pa.Table) -> list[dict]:
    """One section per metadata filter (prepare's rules, in funnel order), with examples from
    the first SCAN_ROWS rows of each part, evaluated by the same SQL prepare runs."""

    active = metadata_rules(cfg, set(cfg.source.columns), DUCKDB)
    examples: dict[str, dict[str, list]] = {name: {"kept": [], "dropped": []} for name, _ in active}
    for part in cfg.subset.parts:
        raw_dir = part_dir("fetch", part)
        path = raw_dir / read_json(raw_dir / "fetch.json")["file"]
        columns, aliases, fmt = effective_source(cfg)
        schema, _, arrow = source_schema(path, fmt)
        pairs = canonical_columns(schema, columns, path, aliases)
        con = duckdb_source(cfg, path, arrow, part_ids(cfg, part, pairs, schema), limit=SCAN_ROWS)
        # a blocklisted link is never shown: its rule drops no example here (and, never
        # downloaded, it is no kept example either)
        unblocked = "".join(f", false AS {blocked_column(entry.name)}" for entry in cfg.prepare.blocklists)
        con.execute(f"CREATE TEMP TABLE part_rows AS SELECT *{unblocked} FROM ({rows_sql(cfg, part, pairs, DUCKDB)})")
        con.register("downloaded", pa.table({"key": [k for k in images.keys() if k.startswith(f"{part:05d}")]}))
        has_images = con.execute("SELECT count(*) FROM downloaded").fetchone()[0] > 0
        names = [dst for _, dst in pairs] + (["language"] if cfg.prepare.languages else [])
        for i, (name, predicate) in enumerate(active):
            before, this = where(active[:i]), where(active[i:i + 1])
            kept_condition = (f"{before} AND {this} AND {_not_blocked(con, blocked)}"
                              + (" AND key IN (SELECT key FROM downloaded)" if has_images else ""))
            shown = ", ".join(DUCKDB.quote(c) for c in dict.fromkeys(["key", "url", "caption",
                                                                      *_used(predicate, names)]))
            got = examples[name]
            got["kept"] += _spread(con, "part_rows", kept_condition, shown)
            dropped = _spread(con, "part_rows", f"{before} AND NOT {this}", shown)
            for row in dropped:
                row["note"] = ("not in the id list" if name == "ids" else
                               _note(row, [c for c in _used(predicate, names) if c not in ("url", "caption")]))
            got["dropped"] += dropped
    sections = []
    previous = "rows_in"
    for name, predicate in active:
        got = examples[name]
        kept = [_with_image(e, images) for e in _evenly(got["kept"])]
        sections.append({"name": f"prepare.{name}", "title": f"metadata filter: {name}",
                         "description": f"prepare rule `{predicate}`; dropped rows were never downloaded "
                                        f"(examples from the first {SCAN_ROWS:,} rows of each part)",
                         "kept_count": result.get(f"after_{name}"),
                         "dropped_count": result.get(previous, 0) - result.get(f"after_{name}", 0),
                         "kept": kept, "dropped": _evenly(got["dropped"])})
        previous = f"after_{name}"
    return sections


def _evenly(rows: list, limit: int = EXAMPLES) -> list:
    step = max(len(rows) // limit, 1)
    return rows[::step][:limit]


def _dedup_sections(cfg, images: ShardImages, blocked: pa.Table) -> list[dict]:
    """Rows dedup dropped (never downloaded: shown with the image of the copy that was kept)
    and rows it kept."""
    keys = list(cfg.dedup.keys)
    if not keys:
        return []
    prepared = [str(part_dir("prepare", p) / "metadata.parquet") for p in cfg.subset.parts]
    deduped = [str(part_dir("dedup", p) / "metadata.parquet") for p in cfg.subset.parts]
    con = duckdb.connect()
    quoted = ", ".join(DUCKDB.quote(k) for k in keys)
    con.execute(f"CREATE TEMP VIEW prepared AS SELECT key, url, caption, {quoted}, row_number() OVER () AS _row "
                f"FROM read_parquet([{', '.join(map(sql_string, prepared))}], union_by_name=true)")
    con.execute(f"CREATE TEMP VIEW deduped AS SELECT key, url, caption, {quoted}, row_number() OVER () AS _row "
                f"FROM read_parquet([{', '.join(map(sql_string, deduped))}], union_by_name=true)")
    on = " AND ".join(f"p.{DUCKDB.quote(k)} IS NOT DISTINCT FROM d.{DUCKDB.quote(k)}" for k in keys)
    con.execute(f"""CREATE TEMP VIEW dropped AS SELECT p.key, p.url, p.caption, p._row, d.key AS twin FROM prepared p
                    LEFT JOIN deduped d ON {on} WHERE p.key NOT IN (SELECT key FROM deduped)""")
    con.register("downloaded", pa.table({"key": images.keys()}))
    dropped = _spread(con, "dropped", f"twin IS NULL OR {_not_blocked(con, blocked, 'twin')}", "key, url, caption, twin")
    for row in dropped:
        row["note"] = f"duplicate of {row['twin']}" + (" (picture: that copy's)" if row["twin"] in images else "")
        _with_image(row, images, row["twin"])
    kept = [_with_image(e, images) for e in _spread(con, "deduped", "key IN (SELECT key FROM downloaded) AND "
                                                     + _not_blocked(con, blocked), "key, url, caption")]
    n_prepared, n_deduped = (sum(pq.read_metadata(f).num_rows for f in files) for files in (prepared, deduped))
    return [{"name": "dedup", "title": f"dedup on {', '.join(keys)}",
             "description": "the first occurrence in part order wins; duplicates were never downloaded "
                            "(a dropped row shows the image of the copy that was kept)",
             "kept_count": n_deduped, "dropped_count": n_prepared - n_deduped, "kept": kept, "dropped": dropped}]


def _download_sections(cfg, result: dict, images: ShardImages, blocked: pa.Table) -> list[dict]:
    """Rows whose download failed (with the reason) and rows downloaded."""

    # img2dataset's per-shard parquet files: always in the part's directory (also with download.shards_url)
    files = [str(f) for p in cfg.subset.parts for f in sorted(part_dir("download", p).glob("*.parquet"))]
    if not files:
        return []
    con = duckdb.connect()
    deduped = [str(part_dir("dedup", p) / "metadata.parquet") for p in cfg.subset.parts]
    con.execute(f"""CREATE TEMP VIEW attempts AS SELECT m.key, m.url, m.caption, a.status, a.error_message,
                    row_number() OVER (ORDER BY m.key) AS _row
                    FROM read_parquet([{', '.join(map(sql_string, files))}], union_by_name=true) a
                    JOIN read_parquet([{', '.join(map(sql_string, deduped))}], union_by_name=true) m
                    ON a.{DUCKDB.quote(KEY_COLUMN)} = m.key""")
    dropped = _spread(con, "attempts", "status <> 'success'", "key, url, caption, error_message")
    for row in dropped:
        row["note"] = classify(row.pop("error_message"))
        row["image"] = None
    kept = [_with_image(e, images) for e in _spread(con, "attempts", f"status = 'success' AND {_not_blocked(con, blocked)}",
                                                     "key, url, caption")]
    return [{"name": "download", "title": "download (img2dataset)",
             "description": "failures by reason; refusals by the URL policy are counted in the funnel only",
             "kept_count": result.get("downloaded_ok"), "dropped_count": result.get("download_failed"),
             "kept": kept, "dropped": dropped}]


def _captions(cfg, keys: list[str]) -> dict[str, tuple]:
    """key -> (url, caption) of a few samples, from the deduplicated metadata."""
    if not keys:
        return {}
    files = [str(part_dir("dedup", p) / "metadata.parquet") for p in cfg.subset.parts]
    con = duckdb.connect()
    con.register("wanted", pa.table({"key": keys}))
    rows = con.execute(f"SELECT key, url, caption FROM read_parquet([{', '.join(map(sql_string, files))}], "
                       "union_by_name=true) WHERE key IN (SELECT key FROM wanted)").fetchall()
    return {key: (url, caption) for key, url, caption in rows}


def _select_sections(cfg, con, result: dict, images: ShardImages) -> list[dict]:
    """One section per select rule, over the tag tables: both kept and dropped were downloaded."""

    # top_fraction's thresholds as select computed them over the whole build
    active = tag_rules(cfg.select, load_stats(SELECTED).get("top_fraction_thresholds") or {})
    relation = "tags"
    if cfg.select.min_clip_similarity_by_language:  # + the samples' language (metadata/language.py)
        join_language(con, cfg, relation, "language_tags")
        relation = "language_tags"
    columns = [name for name, in con.execute(f"SELECT column_name FROM (DESCRIBE {relation})").fetchall()]
    sections = []
    previous = "tagged"
    for i, (name, predicate) in enumerate(active):
        if name.startswith("image_blocklist_"):  # counted, never shown
            sections.append({"name": f"select.{name}", "title": f"image hash list: {name.removeprefix('image_blocklist_')}",
                             "description": "downloaded samples whose image hash the list names (the screen stage); "
                                            "no example is shown, and no grid of this report shows a matched sample",
                             "kept_count": result.get(f"after_{name}"),
                             "dropped_count": result.get(previous, 0) - result.get(f"after_{name}", 0),
                             "kept": [], "dropped": []})
            previous = f"after_{name}"
            continue
        used = _used(predicate, columns)
        shown = ", ".join(DUCKDB.quote(c) for c in dict.fromkeys(["key", *used]))
        before, this = where(active[:i]), where(active[i:i + 1])
        kept = _spread(con, relation, f"{before} AND {this}", shown)
        dropped = _spread(con, relation, f"{before} AND NOT {this}", shown)
        captions = _captions(cfg, [row["key"] for row in kept + dropped])
        for row in kept + dropped:
            row["note"] = _note(row, used)
            row["url"], row["caption"] = captions.get(row["key"], (None, None))
            _with_image(row, images)
        sections.append({"name": f"select.{name}", "title": f"select: {name}",
                         "description": f"select rule `{predicate}` over the tags",
                         "kept_count": result.get(f"after_{name}"),
                         "dropped_count": result.get(previous, 0) - result.get(f"after_{name}", 0),
                         "kept": kept, "dropped": dropped})
        previous = f"after_{name}"
    return sections

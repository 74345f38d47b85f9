"""Filters as rules: (name, SQL predicate) pairs applied in order, each counted the same way
(`after_<name>` in the funnel). Prepare's metadata filters and select's tag rules both go
through here, so every filter reports what it drops. The counts come from one aggregate scan
and the filter is one WHERE clause: nothing is materialised in between."""

from __future__ import annotations

from typing import Callable, Iterable

from laionbuild.engine.sql import DUCKDB, SqlDialect
from laionbuild.project.funnel import Counts

Rule = tuple[str, str]


def _holds(predicate: str) -> str:
    return f"coalesce(({predicate}), false)"  # a NULL result fails the rule


def where(rules: Iterable[Rule]) -> str:
    return " AND ".join(_holds(p) for _, p in rules) or "true"


def count(query_one: Callable[[str], tuple], relation: str, rules: list[Rule], counts: Counts,
          rows_name: str | None = None) -> None:
    """Count the rows of `relation` left after each rule in turn, in one scan. `query_one` runs
    a query on the engine and returns its single row (DuckDB and Spark SQL both accept it)."""
    columns = ["count(*)"]
    for i in range(len(rules)):
        columns.append(f"sum(CASE WHEN {where(rules[: i + 1])} THEN 1 ELSE 0 END)")
    values = query_one(f"SELECT {', '.join(columns)} FROM {relation}")
    if rows_name:
        counts.set(rows_name, values[0])
    for (name, _), value in zip(rules, values[1:]):
        counts.set(f"after_{name}", value or 0)


def sql_string(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _has_url(dialect: SqlDialect) -> str:
    """`url IS NOT NULL AND trim(url) <> ''`. On DuckDB, a URL whose first character is ASCII
    and not a space (among ASCII characters, DuckDB's trim removes the space only) holds without
    trimming: the same result, without a trimmed copy of every URL (a CASE, as DuckDB evaluates
    its branches lazily; an OR evaluates both sides)."""
    if dialect.name == "duckdb":
        return "url IS NOT NULL AND CASE WHEN unicode(url) BETWEEN 33 AND 127 THEN true ELSE trim(url) <> '' END"
    return "url IS NOT NULL AND trim(url) <> ''"


def metadata_rules(cfg, columns: set[str], dialect: SqlDialect = DUCKDB) -> list[Rule]:
    """The metadata filters in funnel order. A rule whose column the source lacks is skipped."""
    p = cfg.prepare
    out: list[Rule] = [("has_url", _has_url(dialect))]
    if cfg.source.ids_url:
        out.append(("ids", "_in_ids"))
    for entry in p.blocklists:  # metadata/blocklists.py adds the `_blocked_<name>` columns
        out.append((f"blocklist_{entry.name}", f"NOT _blocked_{entry.name}"))
    if "nsfw" in columns and (p.nsfw.drop or p.nsfw.drop_missing):
        dropped = ", ".join(sql_string(v) for v in p.nsfw.drop) or "NULL"
        # explicit NULL handling: `nsfw NOT IN (...)` alone would silently drop missing tags
        missing = "false" if p.nsfw.drop_missing else "true"
        out.append(("nsfw", f"CASE WHEN nsfw IS NULL THEN {missing} ELSE nsfw NOT IN ({dropped}) END"))
    if p.min_similarity is not None:
        out.append(("min_similarity", f"similarity >= {float(p.min_similarity)!r}"))
    words = dialect.words("caption")
    for key, expr, op in (("min_caption_chars", "length(coalesce(caption, ''))", ">="),
                          ("max_caption_chars", "length(coalesce(caption, ''))", "<="),
                          ("min_caption_words", words, ">="), ("max_caption_words", words, "<=")):
        if getattr(p, key) is not None:
            out.append((key, f"{expr} {op} {int(getattr(p, key))}"))
    if p.languages:
        out.append(("language", f"language IN ({', '.join(sql_string(x) for x in p.languages)})"))
    if p.caption_word_list:
        out.append(("caption_words", "_caption_words"))  # metadata/words.py, a column of rows_sql
    if p.min_width is not None:
        out.append(("min_width", f"width >= {int(p.min_width)}"))
    if p.min_height is not None:
        out.append(("min_height", f"height >= {int(p.min_height)}"))
    if p.max_aspect_ratio is not None:
        out.append(("max_aspect_ratio", f"least(width, height) > 0 AND "
                                        f"greatest(width, height) <= {float(p.max_aspect_ratio)!r} * least(width, height)"))
    return out


def tag_rules(select_cfg, thresholds: dict | None = None) -> list[tuple[str, str]]:
    """(name, SQL predicate over tag columns) for every active rule, in funnel order.
    `thresholds`: {column: its select.top_fraction threshold over the whole build, None when the
    column has no value at all}, which select computes first; without them those rules are only
    named (the funnel's step order) and their predicates fail if run."""
    out = []
    for entry in select_cfg.image_blocklists:  # select adds `_image_blocked_<name>` (the screen stage's keys)
        out.append((f"image_blocklist_{entry.name}", f"NOT _image_blocked_{entry.name}"))
    if by_language := select_cfg.min_clip_similarity_by_language:
        # one rule, a threshold per language (`language`: metadata/language.py joins it); the others
        # (and samples without a language) have min_clip_similarity, or no CLIP rule if it is None
        default = select_cfg.min_clip_similarity
        cases = " ".join(f"WHEN {sql_string(code)} THEN clip_similarity >= {float(value)!r}"
                         for code, value in sorted(by_language.items()))
        otherwise = f"clip_similarity >= {float(default)!r}" if default is not None else "true"
        out.append(("min_clip_similarity", f"CASE language {cases} ELSE {otherwise} END"))
    elif select_cfg.min_clip_similarity is not None:
        out.append(("min_clip_similarity", f"clip_similarity >= {float(select_cfg.min_clip_similarity)!r}"))
    if select_cfg.min_faces is not None:
        out.append(("min_faces", f"face_count >= {int(select_cfg.min_faces)}"))
    if select_cfg.min_face_score is not None:
        out.append(("min_face_score", f"face_max_score >= {float(select_cfg.min_face_score)!r}"))
    for name, value in sorted(select_cfg.min_scores.items()):
        out.append((f"min_{name}", f"{quote(name)} >= {float(value)!r}"))
    for name, value in sorted(select_cfg.max_scores.items()):
        out.append((f"max_{name}", f"{quote(name)} <= {float(value)!r}"))
    for name in sorted(select_cfg.top_fraction):
        out.append((f"top_{name}", _at_least_threshold(name, thresholds)))
    if select_cfg.max_near_dup_similarity is not None:
        out.append(("max_near_dup_similarity", f"near_dup_similarity < {float(select_cfg.max_near_dup_similarity)!r}"))
    if select_cfg.in_target_clusters:  # data/clusters (the clusters stage), joined by key
        out.append(("in_target_clusters", "coalesce(in_target_cluster, false)"))
    if (unsafe := select_cfg.unsafe_keywords) is not None:  # the tag stage's `unsafe_keyword` (metadata/keywords.py)
        out.append(("unsafe_keywords", f"NOT (coalesce({quote(unsafe.score)} > {float(unsafe.above)!r}, false) "
                                       "AND coalesce(unsafe_keyword, false))"))
    return out


def _at_least_threshold(column: str, thresholds: dict | None) -> str:
    if thresholds is None or column not in thresholds:
        return quote(f"threshold of {column} not computed")  # an unbound column: an error if run
    if thresholds[column] is None:
        return "false"
    value = f"CAST({quote(column)} AS DOUBLE)"  # NaN, which DuckDB orders above every number, never holds
    return f"NOT isnan({value}) AND {value} >= CAST({sql_string(repr(float(thresholds[column])))} AS DOUBLE)"


def quote(name: str) -> str:
    return DUCKDB.quote(name)

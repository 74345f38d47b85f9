"""Offline caption language identification with langid.py (its model ships inside the package).

`detect(captions, min_score)` returns ISO 639-1 codes, or None where the caption is empty or
the normalised probability of the best language is below `min_score`.

The samples' `language` column (detected by prepare.languages, or the source's own, e.g.
LAION-2B-multi's LANGUAGE mapped by source.columns.language) lives in the prepared metadata;
`join_language` adds it to a relation of tags by key, for select.min_clip_similarity_by_language
and the report's kept share per language."""

from __future__ import annotations

from functools import lru_cache

from laionbuild.metadata.rules import quote, sql_string
from laionbuild.project.layout import part_dir
from laionbuild.recipe.errors import InputError

LANGUAGE_COLUMN = "language"
ORDER_COLUMN = "_language_row"  # the relation's row order, kept through the join


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect(captions, min_score: float = 0.0) -> list:
    identify = _identifier().classify
    out = []
    for caption in captions:
        if caption is None or not str(caption).strip():
            out.append(None)
            continue
        language, score = identify(str(caption))
        out.append(language if score >= min_score else None)
    return out


@lru_cache(maxsize=1)
def known_languages() -> frozenset:
    """The ISO 639-1 codes langid can return (prepare.languages is checked against them)."""
    return frozenset(_identifier().nb_classes)


def metadata_relation(cfg) -> str:
    """The build's deduplicated metadata (every part), as a DuckDB relation."""
    files = [part_dir("dedup", p) / "metadata.parquet" for p in cfg.subset.parts]
    return f"read_parquet([{', '.join(sql_string(f) for f in files)}], union_by_name=true)"


def has_language(con, cfg) -> bool:
    """Whether the build's deduplicated metadata has a `language` column."""
    names = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {metadata_relation(cfg)}").fetchall()]
    return LANGUAGE_COLUMN in names


def join_language(con, cfg, relation: str, out_view: str) -> None:
    """Create `out_view`: `relation`'s rows in their order (`_language_row`) with the `language`
    column of the deduplicated metadata, joined by key (NULL where a sample has none)."""
    if not has_language(con, cfg):
        raise InputError(f"{part_dir('dedup', cfg.subset.parts[0]) / 'metadata.parquet'}: no `language` column "
                         "(map the source's with source.columns.language, or detect it with prepare.languages); "
                         "rebuild prepare")
    column = quote(LANGUAGE_COLUMN)
    con.execute(f"""CREATE TEMP VIEW {out_view} AS SELECT t.*, m.{column} FROM
                    (SELECT *, row_number() OVER () AS {ORDER_COLUMN} FROM {relation}) t
                    LEFT JOIN (SELECT key, {column} FROM {metadata_relation(cfg)}) m ON t.key = m.key
                    ORDER BY t.{ORDER_COLUMN}""")

"""Offline caption language identification: langid.py (its model ships inside the package; the
default) or fastText (`prepare.language_detector: fasttext` with `prepare.language_model`, a
model file such as fastText's lid.176.bin, the detector of DataComp's basic, text- and
image-based baselines).

`detect(captions, min_score, detector, model)` returns ISO 639-1 codes (fastText's labels
without `__label__`), or None where the caption is empty or the probability of the best
language is below `min_score` (langid's normalised probability; fastText's softmax). fastText
reads one line, so newlines are spaces first, as DataComp's get_fasttext_language does.

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
LABEL = "__label__"


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


@lru_cache(maxsize=2)
def _fasttext(path: str):
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # its load_model warning on every load
    return fasttext.load_model(path)


def detect(captions, min_score: float = 0.0, detector: str = "langid", model: str | None = None) -> list:
    captions = [None if c is None or not str(c).strip() else str(c) for c in captions]
    if detector == "fasttext":
        texts = [c.replace("\n", " ").replace("\r", " ") for c in captions if c is not None]
        labels, scores = _fasttext(model).predict(texts, k=1) if texts else ([], [])
        found = iter((label[0][len(LABEL):], float(score[0])) for label, score in zip(labels, scores))
    else:
        identify = _identifier().classify
        found = (identify(c) for c in captions if c is not None)
    out = []
    for caption in captions:
        if caption is None:
            out.append(None)
            continue
        language, score = next(found)
        out.append(language if score >= min_score else None)
    return out


def known_languages(detector: str = "langid", model: str | None = None) -> frozenset:
    """The codes the detector can return (prepare.languages is checked against them)."""
    if detector == "fasttext":
        return frozenset(label[len(LABEL):] for label in _fasttext(model).get_labels())
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

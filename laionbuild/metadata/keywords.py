"""select.unsafe_keywords: Re-LAION-5B research's rule, "the unsafe score is above X and the
caption holds a keyword of the list" (docs/safety.md).

The keyword file (local or any fsspec URL, gzip'd when it ends in .gz) holds one keyword or
phrase a line, UTF-8; blank lines and lines starting with `#` are skipped. A keyword matches a
caption as a whole word, case-insensitively: the caption holds it (any letter case, Unicode
simple case folding) with no letter, digit or underscore right before or after it ("gun"
matches "Gun!" and "a gun shop", not "guns" or "begun"). One regular expression (RE2, in
DuckDB) over the captions of the prepared metadata, joined to the tags by key.
"""

from __future__ import annotations

from laionbuild.metadata.rules import quote, sql_string
from laionbuild.project.layout import part_dir
from laionbuild.recipe.errors import InputError, MissingInputError

INPUT_FILE = "keywords.json"  # data/inputs/keywords.json (project/inputs.py)
KEYWORD_COLUMN = "_unsafe_keyword"
_SPECIAL = set("\\.^$|?*+()[]{}")
_NOT_WORD = r"[^\pL\pN_]"


def read_keywords(url: str) -> list[str]:
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MissingInputError(f"{url}: select.unsafe_keywords.keywords: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{url}: select.unsafe_keywords.keywords: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); re-encode it as UTF-8") from None
    words = [line.strip() for line in lines]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise InputError(f"{url}: select.unsafe_keywords.keywords: holds no keyword (one a line)")
    return words


def _escape(word: str) -> str:
    return "".join("\\" + ch if ch in _SPECIAL else ch for ch in word)


def pattern(words: list[str]) -> str:
    """The RE2 expression a caption holding one of `words` matches (whole word, any case)."""
    alternatives = "|".join(_escape(w) for w in sorted(words, key=len, reverse=True))
    return f"(?i)(?:^|{_NOT_WORD})(?:{alternatives})(?:{_NOT_WORD}|$)"


def apply(con, cfg, relation: str, out_view: str, tag_columns: list[str]) -> None:
    """Create `out_view`: `relation`'s rows (in their order, as `_kw_row`) with the score column
    (from the tags, or else from the deduplicated metadata of the build's parts) and `_unsafe_keyword`."""
    rule = cfg.select.unsafe_keywords
    metadata_files = [part_dir("dedup", p) / "metadata.parquet" for p in cfg.subset.parts]
    files = f"[{', '.join(sql_string(f) for f in metadata_files)}]"
    metadata = f"read_parquet({files}, union_by_name=true)"
    names = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {metadata}").fetchall()]
    extra = ""
    if rule.score not in tag_columns:
        if rule.score not in names:
            raise InputError(f"select.unsafe_keywords.score: no `{rule.score}` column in the tags (a tag.heads score: "
                             f"{[c for c in tag_columns if c not in ('key', 'part')]}) nor in the prepared metadata "
                             f"({metadata_files[0]}: {names})")
        extra = f", m.{quote(rule.score)}"
    regex = sql_string(pattern(read_keywords(rule.keywords)))
    con.execute(f"""CREATE TEMP VIEW {out_view} AS SELECT t.*{extra},
                    regexp_matches(coalesce(m.caption, ''), {regex}) AS {KEYWORD_COLUMN} FROM
                    (SELECT *, row_number() OVER () AS _kw_row FROM {relation}) t
                    LEFT JOIN (SELECT key, caption{extra.replace('m.', '')} FROM {metadata}) m ON t.key = m.key""")

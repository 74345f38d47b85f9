"""tag.unsafe_keywords + select.unsafe_keywords: Re-LAION-5B research's rule, "the unsafe score
is above X and the caption holds a keyword of the list" (docs/safety.md).

The keyword file (local or any fsspec URL, gzip'd when it ends in .gz) holds one keyword or
phrase a line, UTF-8; blank lines and lines starting with `#` are skipped. A keyword matches a
caption as a whole word, case-insensitively: the caption holds it (any letter case, Unicode
simple case folding) with no letter, digit or underscore right before or after it ("gun"
matches "Gun!" and "a gun shop", not "guns" or "begun"). One regular expression (RE2, in
DuckDB) over a part's deduplicated captions, once per part in the tag stage (the tag column
`unsafe_keyword`), so select's rule is a scan of two tag columns: a sweep of the score threshold
matches no caption again (at 400M captions the regex costs minutes of CPU; the scan seconds).
"""

from __future__ import annotations

import pyarrow as pa

from laionbuild.metadata.rules import sql_string
from laionbuild.recipe.errors import InputError, MissingInputError

INPUT_FILE = "keywords.json"  # data/inputs/keywords.json (project/inputs.py)
KEYWORD_COLUMN = "unsafe_keyword"  # the tag
_SPECIAL = set("\\.^$|?*+()[]{}")
_NOT_WORD = r"[^\pL\pN_]"


def read_keywords(url: str) -> list[str]:
    import fsspec

    from laionbuild.project.inputs import local_copy

    path = local_copy(url, INPUT_FILE, "tag.unsafe_keywords")  # remote: one copy per version, not one a part
    try:
        with fsspec.open(str(path), "rt", encoding="utf-8", compression="infer") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MissingInputError(f"{url}: tag.unsafe_keywords: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{url}: tag.unsafe_keywords: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); re-encode it as UTF-8") from None
    words = [line.strip() for line in lines]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise InputError(f"{url}: tag.unsafe_keywords: holds no keyword (one a line)")
    return words


def _escape(word: str) -> str:
    return "".join("\\" + ch if ch in _SPECIAL else ch for ch in word)


def pattern(words: list[str]) -> str:
    """The RE2 expression a caption holding one of `words` matches (whole word, any case)."""
    alternatives = "|".join(_escape(w) for w in sorted(words, key=len, reverse=True))
    return f"(?i)(?:^|{_NOT_WORD})(?:{alternatives})(?:{_NOT_WORD}|$)"


def matches(url: str, captions: pa.ChunkedArray) -> pa.Array:
    """For each caption, whether it holds a keyword of the file at `url` (a null caption holds
    none): one RE2 expression in DuckDB over the column, in its order."""
    import duckdb

    con = duckdb.connect()
    con.register("captions", pa.table({"caption": captions}))
    regex = sql_string(pattern(read_keywords(url)))
    hits = con.execute(f"SELECT coalesce(regexp_matches(caption, {regex}), false) AS hit FROM captions").fetchnumpy()
    return pa.array(hits["hit"], pa.bool_())  # (DuckDB keeps a scan's row order: preserve_insertion_order)

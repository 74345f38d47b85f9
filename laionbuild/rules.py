"""Filters as rules: (name, SQL predicate) pairs applied in order to a DuckDB table, each one
counted the same way (`after_<name>` in the funnel). Prepare's metadata filters and select's
tag rules both go through here, so every filter reports what it drops."""

from __future__ import annotations

from typing import Iterable

from .funnel import Counts

Rule = tuple[str, str]


def apply(con, table: str, rules: Iterable[Rule], counts: Counts) -> None:
    """Delete the rows of `table` failing any rule (a NULL result fails), counting after each."""
    for name, predicate in rules:
        con.execute(f"DELETE FROM {table} WHERE NOT coalesce(({predicate}), false)")
        counts.set(f"after_{name}", con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def sql_string(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"

"""Filters as rules: (name, SQL predicate) pairs applied in order, each counted the same way
(`after_<name>` in the funnel). Prepare's metadata filters and select's tag rules both go
through here, so every filter reports what it drops. The counts come from one aggregate scan
and the filter is one WHERE clause: nothing is materialised in between."""

from __future__ import annotations

from typing import Callable, Iterable

from .funnel import Counts

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

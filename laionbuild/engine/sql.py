"""The SQL a stage builds, spelled for its engine: DuckDB in-process (`engine=local`) or Spark SQL
(`engine=spark`). Both take the same rules and produce the same rows, keys and order; the engine is
an execution detail, so `dvc.yaml` does not list `engine` as a stage parameter (switching engines
reruns nothing that is already built). The Spark session itself: laionbuild.engine.spark.
"""

from __future__ import annotations


class SqlDialect:
    """The few SQL spellings that differ between DuckDB and Spark SQL."""

    def __init__(self, name: str):
        self.name = name

    def key(self, part: int, row: str) -> str:
        # 5-digit part + 9-digit row (row < 10**9, checked by prepare)
        if self.name == "duckdb" and 0 <= int(part) < 10**5:
            # one integer cast, the leading 1 cut off: a third cheaper than lpad's concatenation
            return f"substr(CAST({row} + {10**14 + int(part) * 10**9} AS VARCHAR), 2)"
        # lpad is spelled the same in both and is faster than printf
        return f"'{int(part):05d}' || lpad(CAST({row} AS {self.string_type}), 9, '0')"

    @property
    def string_type(self) -> str:
        return "VARCHAR" if self.name == "duckdb" else "STRING"

    def words(self, column: str) -> str:
        """The number of words as Python's str.split() counts them (DataComp's caption filters):
        runs of anything but whitespace, where whitespace is str.isspace's set (ASCII blanks,
        \\x1c-\\x1f, \\x85 and Unicode's separators, NBSP among them)."""
        if self.name == "duckdb":
            return f"coalesce(len(regexp_extract_all({column}, '[^{_SPACE_RE2}]+')), 0)"
        return f"coalesce(size(filter(split({column}, '[{_SPACE_JAVA}]+'), w -> w != '')), 0)"

    def collect_list(self, column: str) -> str:
        # both skip NULLs (Spark's collect_list always does; DuckDB's list() would keep them)
        if self.name == "duckdb":
            return f"list({column}) FILTER (WHERE {column} IS NOT NULL)"
        return f"collect_list({column})"

    def quote(self, name: str) -> str:
        if self.name == "duckdb":
            return '"' + name.replace('"', '""') + '"'
        return "`" + name.replace("`", "``") + "`"


# str.isspace's characters, as a regular-expression class body: RE2 (DuckDB) and Java (Spark,
# in a SQL string literal, whose backslashes are escapes)
_SPACE_RE2 = r"\s\x0b\x1c-\x1f\x{85}\pZ"
_SPACE_JAVA = r"\\s\\x0b\\x1c-\\x1f\\x85\\p{Z}"

DUCKDB = SqlDialect("duckdb")
SPARK = SqlDialect("spark")

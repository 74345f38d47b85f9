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
        split = (f"len(regexp_split_to_array(trim({column}), '\\s+'))" if self.name == "duckdb"
                 else f"size(split(trim({column}), '\\\\s+'))")
        return f"CASE WHEN trim(coalesce({column}, '')) = '' THEN 0 ELSE {split} END"

    def collect_list(self, column: str) -> str:
        # both skip NULLs (Spark's collect_list always does; DuckDB's list() would keep them)
        if self.name == "duckdb":
            return f"list({column}) FILTER (WHERE {column} IS NOT NULL)"
        return f"collect_list({column})"

    def quote(self, name: str) -> str:
        if self.name == "duckdb":
            return '"' + name.replace('"', '""') + '"'
        return "`" + name.replace("`", "``") + "`"


DUCKDB = SqlDialect("duckdb")
SPARK = SqlDialect("spark")

"""consolidate (optional, `source.consolidate_parts`): many source files -> N parquet parts, as
laion-prepro turned hundreds of thousands of crawl CSVs into 32 parquet files.

Every source file (`source.files` glob, or every part of `source.part_pattern`) is fetched
resumably, mapped to canonical columns (`source.columns` + `source.column_aliases`, so files
whose columns are named or ordered differently line up), then rows are shuffled with
`source.consolidate_seed`: row r of file f goes to part md5(seed:f:r) mod N, ordered by that
hash. Deterministic, balanced, and DuckDB spills when the input exceeds memory. Writes
`data/consolidated/part-NNNNN.parquet`; fetch then takes parts from there. When
`consolidate_parts` is null this stage only records that it is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import duckdb
import pyarrow.parquet as pq

from laionbuild.metadata.rules import sql_string
from laionbuild.metadata.sources import canonical_columns, file_format, input_urls, read_arrow
from laionbuild.metadata.transfer import fetch_file
from laionbuild.project.atomic import atomic_dir, write_json
from laionbuild.project.inputs import fingerprint, recorded_inputs
from laionbuild.project.layout import CONSOLIDATED, TMP, WORK

log = logging.getLogger(__name__)


def run(cfg) -> None:
    s = cfg.source
    with atomic_dir(CONSOLIDATED) as out:
        if not s.consolidate_parts:
            write_json(out / "consolidate.json", {"enabled": False})
            return
        urls = input_urls(cfg)
        staging = TMP / "consolidate"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        columns = dict(s.columns)
        aliases = {k: list(v) for k, v in s.column_aliases.items()}
        staged, rows_in = [], 0
        # the fingerprints the inputs stage recorded (this stage's dependency): no second metadata
        # request per file; one is sent only for a file that check did not see
        checked = recorded_inputs("consolidate.json")
        for i, url in enumerate(urls):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            # fetched once per content: a republished file (another fingerprint) is fetched again
            key = url + json.dumps(checked.get(url) or fingerprint(url), sort_keys=True)
            work = WORK / "consolidate" / hashlib.sha256(key.encode()).hexdigest()[:16]
            local = work / name
            if not local.exists():
                fetch_file(url, local, work / f"{name}.partial", retries=s.fetch_retries, backoff=s.fetch_backoff_s)
            fmt = file_format(local, s.format)
            table = pq.read_table(local) if fmt == "parquet" else read_arrow(local, fmt).drop(["_row"])
            pairs = canonical_columns(table.schema, columns, local, aliases)
            # only the canonical columns: the other columns of raw crawl files do not line up
            wanted = {src: dst for src, dst in pairs if dst in columns}
            table = table.select(list(wanted)).rename_columns(list(wanted.values()))
            path = staging / f"{i:06d}.parquet"
            pq.write_table(table, path)
            staged.append(path)
            rows_in += table.num_rows
        spill = TMP / "duckdb"
        spill.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(config={"temp_directory": str(spill)})
        files = "[" + ", ".join(sql_string(p) for p in staged) + "]"
        n, seed = int(s.consolidate_parts), int(s.consolidate_seed)
        con.execute(f"""CREATE TEMP TABLE shuffled AS
                        SELECT * EXCLUDE (filename, file_row_number), md5_number(concat({seed}, ':', filename, ':',
                               file_row_number)) AS _h
                        FROM read_parquet({files}, union_by_name=true, filename=true, file_row_number=true)""")
        for part in range(n):
            con.execute(f"""COPY (SELECT * EXCLUDE (_h) FROM shuffled WHERE _h % {n} = {part} ORDER BY _h)
                            TO {sql_string(out / f'part-{part:05d}.parquet')} (FORMAT parquet)""")
        write_json(out / "consolidate.json", {"enabled": True, "parts": n, "seed": seed, "inputs": urls,
                                              "rows": rows_in})
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
    log.info("consolidated %d files (%d rows) into %d parts", len(urls), rows_in, n)

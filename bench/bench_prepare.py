"""Metadata benchmark on a generated LAION-400M-style part (default 1M rows): dedup on
(url, caption) keeping the first occurrence + NSFW drop + similarity >= 0.28.

Side by side in one run, each in its own process: the local engine (`laionbuild stage prepare`
then `laionbuild stage dedup`), the Spark engine (local[2]) doing the same, and a plain DuckDB
script doing the same work. Prints wall time and peak RSS above the idle interpreter (whole
process tree, the JVM included, sampled), as ratios, plus the part's Arrow size. Goals (issue
#3): local engine >= 10x faster than Spark, <= 1.2x the plain DuckDB script's time; peak RSS
above idle <= 2x the part's Arrow size. The plain script does less than the stages must (no
`key`, no funnel counts, no prepared part, one process where the stages are two): a second plain
script, "same outputs", does those too, and the local engine is also compared with it.

--scale M1,M2,...: global dedup alone (`laionbuild stage dedup`, dedup.memory_limit=512MB) over
generated prepared parts of 1M rows, M million rows in all; peak RSS should stay flat (DuckDB
spills) and rows/s flat as M grows (issue #3 asks for 10,20,40).

    .venv/bin/python bench/bench_prepare.py [--rows 1000000] [--no-spark]
    .venv/bin/python bench/bench_prepare.py --scale 10,20,40
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "part-00000-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet"


def generate(path: Path, rows: int) -> pa.Table:
    rng = random.Random(0)
    urls = [f"http://img{rng.randrange(1000)}.example.com/{rng.randrange(rows)}.jpg" for _ in range(rows)]
    texts = [f"caption {rng.randrange(rows // 2)}" for _ in range(rows)]
    table = pa.table({
        "SAMPLE_ID": pa.array(range(rows), pa.int64()),
        "URL": urls,
        "TEXT": texts,
        "HEIGHT": pa.array([rng.randrange(50, 2000) for _ in range(rows)], pa.int32()),
        "WIDTH": pa.array([rng.randrange(50, 2000) for _ in range(rows)], pa.int32()),
        "LICENSE": ["?"] * rows,
        "NSFW": [rng.choice(["UNLIKELY", "UNLIKELY", "UNSURE", "NSFW", None]) for _ in range(rows)],
        "similarity": [rng.uniform(0.2, 0.45) for _ in range(rows)],
    })
    pq.write_table(table, path)
    return table


def measure(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the whole process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.read()[-3000:]}")
    return elapsed, peak


DUCKDB_SCRIPT = textwrap.dedent("""
    import sys, duckdb
    src, dst = sys.argv[1], sys.argv[2]
    duckdb.sql(f'''COPY (SELECT * FROM (SELECT *, row_number() OVER () AS _row FROM read_parquet('{src}'))
                      WHERE NSFW IS DISTINCT FROM 'NSFW' AND similarity >= 0.28
                      QUALIFY row_number() OVER (PARTITION BY URL, TEXT ORDER BY _row) = 1 ORDER BY _row)
                   TO '{dst}' (FORMAT parquet)''')
""")


# The same work with the outputs the two stages must also give: a `key` column, the funnel
# counts after each filter, and the prepared (filtered) part the dedup reads back (a per-part DVC
# output of its own) -- in one process, where the stages are two (two DVC stages).
DUCKDB_SAME_OUTPUTS_SCRIPT = textwrap.dedent("""
    import sys, duckdb
    src, prepared, dst = sys.argv[1], sys.argv[2], sys.argv[3]
    con = duckdb.connect()
    con.execute(f"CREATE VIEW src AS SELECT *, file_row_number AS _row FROM read_parquet('{src}', file_row_number=true)")
    has_url = "URL IS NOT NULL AND trim(URL) <> ''"
    nsfw = "NSFW IS DISTINCT FROM 'NSFW'"
    sim = "similarity >= 0.28"
    counts = con.execute(f'''SELECT count(*), count(*) FILTER ({has_url}), count(*) FILTER ({has_url} AND {nsfw}),
                                    count(*) FILTER ({has_url} AND {nsfw} AND {sim}) FROM src''').fetchone()
    con.execute(f'''COPY (SELECT '00000' || lpad(CAST(_row AS VARCHAR), 9, '0') AS key, * EXCLUDE (_row) FROM src
                          WHERE {has_url} AND {nsfw} AND {sim}) TO '{prepared}' (FORMAT parquet)''')
    con.execute(f'''COPY (SELECT * FROM read_parquet('{prepared}')
                          QUALIFY row_number() OVER (PARTITION BY URL, TEXT ORDER BY key) = 1 ORDER BY key)
                    TO '{dst}' (FORMAT parquet)''')
""")


def compose(project: Path, env: dict, *overrides: str) -> None:
    project.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(BIN / "laionbuild"), "compose", "--conf-dir", str(ROOT / "conf"), *overrides],
                   cwd=project, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prepare_and_dedup(project: Path, source: Path, env: dict, engine: str) -> tuple[float, int, int]:
    compose(project, env, "recipe=laion400m", f"source.base_url={source}", "subset.parts=[0]",
            "prepare.min_similarity=0.28", f"engine={engine}")
    subprocess.run([str(BIN / "laionbuild"), "stage", "fetch", "--part", "0"], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_prep, m_prep = measure([str(BIN / "laionbuild"), "stage", "prepare", "--part", "0"], project, env)
    t_dedup, m_dedup = measure([str(BIN / "laionbuild"), "stage", "dedup"], project, env)
    kept = pq.read_metadata(project / "data/deduped/part_0/metadata.parquet").num_rows
    return t_prep + t_dedup, max(m_prep, m_dedup), kept


def scale(millions: list[int], env: dict) -> None:
    import duckdb

    print(f"{'rows':>12}{'seconds':>9}{'rows/s':>12}{'peak MB':>10}")
    for m in millions:
        with tempfile.TemporaryDirectory() as tmp:
            project = Path(tmp) / "project"
            parts = list(range(m))
            compose(project, env, "recipe=laion400m", f"source.base_url={tmp}", "source.num_parts=1000",
                    f"subset.parts=[{','.join(map(str, parts))}]", "dedup.memory_limit=512MB")
            for p in parts:  # prepared parts straight from DuckDB: 1M rows each, ~1/3 duplicates
                target = project / f"data/prepared/part_{p}"
                target.mkdir(parents=True)
                duckdb.sql(f"""COPY (SELECT printf('%05d%09d', {p}, i) AS key,
                                      'http://img.example.com/' || ((i * 7919 + {p}) % {m * 700_000}) || '.jpg' AS url,
                                      'caption ' || (i % 1000) AS caption, i AS sample_id
                               FROM range(1000000) t(i)) TO '{target}/metadata.parquet' (FORMAT parquet)""")
            seconds, peak = measure([str(BIN / "laionbuild"), "stage", "dedup"], project, env)
        print(f"{m * 1_000_000:>12}{seconds:>9.1f}{m * 1_000_000 / seconds:>12.0f}{peak / (1 << 20):>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-spark", action="store_true")
    parser.add_argument("--scale", help="comma-separated millions of rows for the global dedup scaling run")
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1",
               PYSPARK_PYTHON=sys.executable)
    if args.scale:
        scale([int(x) for x in args.scale.split(",")], env)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        source.mkdir()
        table = generate(source / NAME, args.rows)
        arrow_bytes = table.nbytes
        _, idle = measure([sys.executable, "-c", "import duckdb, pyarrow, time; time.sleep(0.5)"], tmp, env)
        variants = [("local engine", *prepare_and_dedup(tmp / "local", source, env, "local"))]
        if not args.no_spark:
            variants.append(("spark engine local[2]", *prepare_and_dedup(tmp / "spark", source, env, "spark")))
        script = tmp / "plain_duckdb.py"
        script.write_text(DUCKDB_SCRIPT)
        t_duck, m_duck = measure([sys.executable, str(script), str(source / NAME), str(tmp / "out.parquet")], tmp, env)
        variants.append(("plain DuckDB script", t_duck, m_duck, pq.read_metadata(tmp / "out.parquet").num_rows))
        script = tmp / "plain_duckdb_same_outputs.py"
        script.write_text(DUCKDB_SAME_OUTPUTS_SCRIPT)
        t_same, m_same = measure([sys.executable, str(script), str(source / NAME), str(tmp / "prepared.parquet"),
                                  str(tmp / "out2.parquet")], tmp, env)
        variants.append(("plain DuckDB, same outputs", t_same, m_same, pq.read_metadata(tmp / "out2.parquet").num_rows))

    mb = 1 << 20
    print(f"{args.rows} rows, Arrow size {arrow_bytes / mb:.0f} MB; idle interpreter {idle / mb:.0f} MB")
    print(f"{'variant':<28}{'rows kept':>10}{'seconds':>9}{'peak MB':>9}{'above idle/Arrow':>18}"
          f"{'time/DuckDB':>13}{'time/local':>12}")
    t_local = variants[0][1]
    for name, t, m, kept in variants:
        print(f"{name:<28}{kept:>10}{t:>9.2f}{m / mb:>9.0f}{(m - idle) / arrow_bytes:>18.2f}"
              f"{t / t_duck:>13.2f}{t / t_local:>12.2f}")
    print(f"local engine / plain DuckDB same outputs: {t_local / t_same:.2f} (the plain script writes no `key`, "
          "counts nothing and writes no prepared part, in one process where the stages are two)")


if __name__ == "__main__":
    main()

"""prepare.blocklists benchmark: a generated LAION-400M-style part (default 2M rows) prepared
without a list, then with a list of 20M URL md5 hashes (`.txt`, one a line; `--hits` of them
are URLs of the part, the rest random), each `laionbuild stage prepare` in its own process.
Prints wall time and peak RSS above the idle interpreter (the process tree, sampled) of both,
the rows dropped, and checks them against a direct hashlib count. Issue #24; numbers in
docs/benchmarks.md.

`--image`: select.image_blocklists instead, `laionbuild stage screen` over a downloaded part's
shard tables as img2dataset writes them (`--rows` samples in shards of 10,000, one in 20 a
failure without a hash, an `md5` column: the digest of a stand-in for each image's bytes),
without and with a 20M image-md5 list; the matched samples checked against a direct count.

    .venv/bin/python bench/bench_blocklist.py [--rows 2000000] [--hashes 20000000] [--hits 10000]
        [--join-memory 2GB] [--gzip] [--image]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import BIN, NAME, compose, measure  # noqa: E402


def generate_part(path: Path, rows: int) -> None:
    duckdb.sql(f"""COPY (SELECT i AS SAMPLE_ID, 'http://img' || (i % 997) || '.example.com/' || hash(i) || '.jpg' AS URL,
                          'caption ' || (i % 100003) AS TEXT, 300::INTEGER AS HEIGHT, 400::INTEGER AS WIDTH, '?' AS LICENSE,
                          CASE WHEN i % 5 = 0 THEN 'NSFW' ELSE 'UNLIKELY' END AS NSFW, 0.3::DOUBLE AS similarity
                   FROM range({rows}) t(i)) TO '{path}' (FORMAT parquet)""")


def generate_list(path: Path, part: Path, hashes: int, hits: int, gzip: bool) -> set[str]:
    """`hits` md5s of the part's URLs (every 97th row's) among `hashes` lines; returns those URLs."""
    urls = [r[0] for r in duckdb.sql(f"SELECT URL FROM read_parquet('{part}') WHERE SAMPLE_ID % 97 = 0 "
                                     f"ORDER BY SAMPLE_ID LIMIT {hits}").fetchall()]
    con = duckdb.connect()
    con.execute("CREATE TABLE hit_urls (u VARCHAR)")
    con.executemany("INSERT INTO hit_urls VALUES (?)", [(u,) for u in urls])
    compression = ", COMPRESSION gzip" if gzip else ""
    con.execute(f"""COPY (SELECT md5('random ' || i) AS h FROM range({hashes - len(urls)}) t(i)
                          UNION ALL SELECT md5(u) FROM hit_urls)
                    TO '{path}' (FORMAT csv, HEADER false{compression})""")
    return set(urls)


SHARD = 10_000  # img2dataset's number_sample_per_shard default


def generate_shard_tables(folder: Path, rows: int) -> None:
    """A downloaded part's shard tables (data/images/part_0/NNNNN.parquet): img2dataset's key,
    status and md5 columns and our key; every 20th sample failed (no hash)."""
    folder.mkdir(parents=True)
    for shard in range(-(-rows // SHARD)):
        low, high = shard * SHARD, min(rows, (shard + 1) * SHARD)
        duckdb.sql(f"""COPY (SELECT lpad(CAST(i AS VARCHAR), 9, '0') AS key,
                              CASE WHEN i % 20 = 7 THEN 'failed_to_download' ELSE 'success' END AS status,
                              CASE WHEN i % 20 = 7 THEN NULL ELSE md5('image ' || i) END AS md5,
                              '00000' || lpad(CAST(i AS VARCHAR), 9, '0') AS laionbuild_key
                       FROM range({low}, {high}) t(i)) TO '{folder / f"{shard:05d}.parquet"}' (FORMAT parquet)""")


def generate_image_list(path: Path, rows: int, hashes: int, hits: int, gzip: bool) -> int:
    """`hits` image md5s of the part (every 97th sample's, failures included) among `hashes`
    lines; returns how many of them a downloaded sample has (a failure has no hash)."""
    picked = list(range(0, rows, 97))[:hits]
    compression = ", COMPRESSION gzip" if gzip else ""
    duckdb.sql(f"""COPY (SELECT md5('random ' || i) AS h FROM range({hashes - len(picked)}) t(i)
                         UNION ALL SELECT md5('image ' || i) FROM range(0, {97 * len(picked)}, 97) t(i))
                   TO '{path}' (FORMAT csv, HEADER false{compression})""")
    return sum(i % 20 != 7 for i in picked)


def image_main(args, env: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        began = time.perf_counter()
        listed = tmp / ("iwf_md5.txt.gz" if args.gzip else "iwf_md5.txt")
        direct = generate_image_list(listed, args.rows, args.hashes, args.hits, args.gzip)
        print(f"generated {args.hashes} hashes ({listed.stat().st_size / (1 << 20):.0f} MB {listed.suffix}) in "
              f"{time.perf_counter() - began:.0f} s")
        _, idle = measure([sys.executable, "-c", "import duckdb, pyarrow, time; time.sleep(0.5)"], tmp, env)
        results = []
        for label, overrides in (
                ("without a list", []),
                (f"with {args.hashes // 1_000_000}M image-md5 list", [
                    f"select.image_blocklists=[{{name: iwf, path: '{listed}', match: image_md5}}]",
                    f"engine.join_memory_limit={args.join_memory}"])):
            project = tmp / ("with" if overrides else "without")
            compose(project, env, "recipe=laion400m", f"source.base_url={tmp}", "subset.parts=[0]",
                    "download.compute_hash=md5", *overrides)
            generate_shard_tables(project / "data/images/part_0", args.rows)
            seconds, peak = measure([str(BIN / "laionbuild"), "stage", "screen", "--part", "0"], project, env)
            matched = pq.read_metadata(project / "data/screened/part_0/blocked.parquet").num_rows
            results.append((label, seconds, peak, matched))
    mb = 1 << 20
    print(f"idle interpreter {idle / mb:.0f} MB; engine.join_memory_limit={args.join_memory}; {args.rows} samples")
    print(f"{'screen':<28}{'seconds':>9}{'peak above idle MB':>20}{'matched':>9}")
    for label, seconds, peak, matched in results:
        print(f"{label:<28}{seconds:>9.1f}{(peak - idle) / mb:>20.0f}{matched:>9}")
    matched = results[1][3]
    print(f"matched: {matched} (direct count: {direct}){'' if matched == direct else ' MISMATCH'}")
    if matched != direct:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--hashes", type=int, default=20_000_000)
    parser.add_argument("--hits", type=int, default=10_000)
    parser.add_argument("--join-memory", default="2GB", help="engine.join_memory_limit")
    parser.add_argument("--gzip", action="store_true", help="the list as .txt.gz")
    parser.add_argument("--image", action="store_true", help="select.image_blocklists (the screen stage) instead")
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1")
    if args.image:
        image_main(args, env)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        source.mkdir()
        began = time.perf_counter()
        generate_part(source / NAME, args.rows)
        listed = tmp / ("iwf_md5.txt.gz" if args.gzip else "iwf_md5.txt")
        urls = generate_list(listed, source / NAME, args.hashes, args.hits, args.gzip)
        print(f"generated {args.rows} rows and {args.hashes} hashes ({listed.stat().st_size / (1 << 20):.0f} MB "
              f"{listed.suffix}) in {time.perf_counter() - began:.0f} s")
        _, idle = measure([sys.executable, "-c", "import duckdb, pyarrow, time; time.sleep(0.5)"], tmp, env)
        results = []
        for label, overrides in (
                ("without a list", []),
                (f"with {args.hashes // 1_000_000}M md5 list", [
                    f"prepare.blocklists=[{{name: iwf, path: '{listed}', match: url_md5}}]",
                    f"engine.join_memory_limit={args.join_memory}"])):
            project = tmp / ("with" if overrides else "without")
            compose(project, env, "recipe=laion400m", f"source.base_url={source}", "subset.parts=[0]",
                    "prepare.nsfw.drop=[]", *overrides)
            subprocess.run([str(BIN / "laionbuild"), "stage", "fetch", "--part", "0"], cwd=project, env=env,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds, peak = measure([str(BIN / "laionbuild"), "stage", "prepare", "--part", "0"], project, env)
            kept = pq.read_metadata(project / "data/prepared/part_0/metadata.parquet").num_rows
            results.append((label, seconds, peak, kept))
        # the rows the list names, counted directly (hashlib over the part's URLs)
        wanted = {hashlib.md5(u.encode()).hexdigest() for u in urls}
        table = pq.read_table(source / NAME, columns=["URL"]).column("URL").to_pylist()
        direct = sum(hashlib.md5(u.encode()).hexdigest() in wanted for u in table)
    mb = 1 << 20
    print(f"idle interpreter {idle / mb:.0f} MB; engine.join_memory_limit={args.join_memory}")
    print(f"{'prepare':<24}{'seconds':>9}{'peak above idle MB':>20}{'rows kept':>11}")
    for label, seconds, peak, kept in results:
        print(f"{label:<24}{seconds:>9.1f}{(peak - idle) / mb:>20.0f}{kept:>11}")
    dropped = results[0][3] - results[1][3]
    print(f"dropped by the list: {dropped} (direct hashlib count: {direct}){'' if dropped == direct else ' MISMATCH'}")
    if dropped != direct:
        sys.exit(1)


if __name__ == "__main__":
    main()

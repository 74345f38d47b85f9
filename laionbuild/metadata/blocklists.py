"""Hash lists whose matching rows are dropped (Re-LAION-5B's removal, docs/safety.md):
prepare.blocklists (URL hashes and sample ids, before the download) and select.image_blocklists
(hashes of the downloaded images, matched by the `screen` stage).

Each list is read by DuckDB straight from its file (`.txt`: one entry a line; `.csv` with a
header row; `.parquet`; `.txt.gz`/`.csv.gz`), never loaded into Python. The part's side of the
match is computed in SQL from the source row as it is: `md5(url)` / `sha256(url)` (the hex
digest of the URL string's UTF-8 bytes, exactly as in the source, not normalised) or the
`sample_id` column as text; list entries are trimmed, hex digests lower-cased. The match is one
hash join per list whose build side is the part (a part's rows, not the list's millions of
entries) and whose probe side is the list streamed from its file (the plan kept as written:
DuckDB cannot estimate a CSV's rows and would build on the list); it yields the few matched row
numbers, and the rule `blocklist_<name>` drops them (each list its own funnel step). The joins
run under `engine.join_memory_limit` (a speed knob: DuckDB spills to data/.tmp beyond it).

An image list is matched the same way, per part, against the hash column img2dataset wrote
for every downloaded image (`download.compute_hash`: `md5`, `sha256`, `sha512`, the hex digest of
the image's bytes as fetched) in the part's shard tables (data/images/part_N/*.parquet): the
build side is the part's downloaded samples, the probe side the list streamed from its file.
It yields the matched keys (`screen_part`), which select drops by the rules
`image_blocklist_<name>`.

A remote list (any fsspec URL) is copied once per version into data/.work/inputs/ (keyed by
its URL and the fingerprint the `inputs` stage recorded in data/inputs/blocklists.json, or
image_blocklists.json), then read there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import duckdb

from laionbuild.metadata.rules import sql_string
from laionbuild.project.layout import TMP
from laionbuild.recipe.errors import InputError

if TYPE_CHECKING:
    from laionbuild.recipe.schema import Config, Problem

INPUT_FILE = "blocklists.json"  # data/inputs/blocklists.json (project/inputs.py)
IMAGE_INPUT_FILE = "image_blocklists.json"  # select.image_blocklists' lists (a dependency of screen, not of prepare)
# the part's side of each match, over the canonical rows prepare reads
PART_SIDE = {"url_md5": "md5(url)", "url_sha256": "sha256(url)", "sample_id": "CAST(sample_id AS VARCHAR)"}
NEEDS_COLUMN = {"url_md5": "url", "url_sha256": "url", "sample_id": "sample_id"}
HEX_DIGITS = {"url_md5": 32, "url_sha256": 64, "image_md5": 32, "image_sha1": 40, "image_sha256": 64,
              "image_sha512": 128}
# img2dataset's hash column (download.compute_hash) each image list needs; it computes no sha1
IMAGE_HASH = {"image_md5": "md5", "image_sha256": "sha256", "image_sha512": "sha512"}
SAMPLED = 1000  # entries checked for the expected form before the join (a mislabelled list matches nothing)
FORMATS = (".txt", ".csv", ".parquet")


def blocked_column(name: str) -> str:
    """The boolean column of prepare's rows that is true where list `name` matches."""
    return f"_blocked_{name}"


def image_blocked_column(name: str) -> str:
    """The boolean column of select's tag rows that is true where image list `name` matches."""
    return f"_image_blocked_{name}"


def problems(c: Config) -> Iterator[Problem]:
    """Compose-time checks of prepare.blocklists across sections."""
    lists = c.prepare.blocklists
    if lists and c.engine.name == "spark":
        yield ("prepare.blocklists", [e.name for e in lists], "engine=spark does not apply hash lists: build with "
               "engine=local (prepare runs in DuckDB in-process; every other stage gives the same rows either way)")
    for i, entry in enumerate(lists):
        if entry.match in NEEDS_COLUMN and NEEDS_COLUMN[entry.match] not in c.source.columns:
            yield (f"prepare.blocklists.{i}.match", entry.match, f"needs the source's `{NEEDS_COLUMN[entry.match]}` "
                   f"column: map source.columns.{NEEDS_COLUMN[entry.match]} (e.g. SAMPLE_ID), or use url_md5/url_sha256")
        yield from _file_problems(entry, f"prepare.blocklists.{i}")
    for i, entry in enumerate(c.select.image_blocklists):
        key = f"select.image_blocklists.{i}"
        needs = IMAGE_HASH.get(entry.match)
        if needs is None:
            yield (f"{key}.match", entry.match, "img2dataset computes no SHA-1 of the images (download.compute_hash: "
                   "md5, sha256 or sha512): get the list as MD5 or SHA-256 digests")
        elif not c.download.enabled:
            yield (f"{key}.match", entry.match, "needs downloaded images (download.enabled=false downloads none); "
                   "an embeddings-only build cannot be screened by image hashes")
        elif c.download.compute_hash != needs:
            yield (f"{key}.match", entry.match, f"needs img2dataset's `{needs}` of every image, and this build computes "
                   f"{c.download.compute_hash or 'none'}: set download.compute_hash={needs} (the parts are downloaded "
                   "again)")
        yield from _file_problems(entry, key)


def _file_problems(entry, key: str) -> Iterator[Problem]:
    suffix = _suffix(entry.path)
    if entry.path not in ("", "???") and suffix not in FORMATS:
        yield (f"{key}.path", entry.path, f"cannot tell the format of a `{suffix}` file: "
               "name it .txt, .csv or .parquet (.txt.gz, .csv.gz gzip'd)")
    if entry.column is not None and suffix == ".txt":
        yield f"{key}.column", entry.column, "a .txt list has one entry a line and no columns: use null"


def _suffix(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    name = name.removesuffix(".gz")
    return "." + name.rsplit(".", 1)[-1] if "." in name else "(no extension)"


def local_copy(url: str, key: str = "prepare.blocklists", input_file: str = INPUT_FILE) -> Path:
    """Where DuckDB reads the list at `url`: the path itself when local, else a copy made once
    per version (its fingerprint recorded in data/inputs/`input_file`; project/inputs.local_copy)."""
    from laionbuild.project.inputs import local_copy as copy

    return copy(url, input_file, key)


def _relation(path: Path) -> tuple[str, str]:
    """(SQL relation of the list's file, the column holding its entries)."""
    suffix = _suffix(str(path))
    source = sql_string(path)
    if suffix == ".txt":
        return (f"read_csv({source}, header=false, columns={{'entry': 'VARCHAR'}}, delim='\\t', quote='', "
                "escape='', auto_detect=false)", "entry")
    relation = (f"read_csv({source}, header=true, all_varchar=true)" if suffix == ".csv"
                else f"read_parquet({source})")
    return relation, ""


def _entries_sql(con: duckdb.DuckDBPyConnection, entry, path: Path, where: str) -> str:
    """SELECT of the list's normalised entries, as `h`."""
    relation, column = _relation(path)
    if not column:
        try:
            names = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
        except duckdb.Error as exc:
            raise InputError(f"{path}: {where}: cannot read it as {_suffix(str(path))[1:]}: "
                             f"{str(exc).splitlines()[0]}") from None
        if entry.column is not None:
            if entry.column not in names:
                raise InputError(f"{path}: {where}: no column `{entry.column}` (.column); the file has {names}")
            column = entry.column
        elif len(names) == 1:
            column = names[0]
        else:
            raise InputError(f"{path}: {where}: {len(names)} columns {names}: name the one holding the entries "
                             f"in {where}.column")
    value = f"trim(CAST({_quote(column)} AS VARCHAR))"
    if entry.match in HEX_DIGITS:
        value = f"lower({value})"
    return f"SELECT {value} AS h FROM {relation}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_sample(con: duckdb.DuckDBPyConnection, entries: str, entry, path: Path, where: str) -> None:
    """The first entries have the form `match` says (a sha256 list labelled url_md5, or a list of
    URLs, would silently match nothing)."""
    try:
        sample = [row[0] for row in con.execute(f"SELECT h FROM ({entries}) LIMIT {SAMPLED}").fetchall()]
    except duckdb.Error as exc:
        raise InputError(f"{path}: {where}: cannot read it: {str(exc).splitlines()[0]}") from None
    digits = HEX_DIGITS.get(entry.match)
    bad = [h for h in sample if h is not None and h != "" and digits is not None
           and (len(h) != digits or any(ch not in "0123456789abcdef" for ch in h))]
    if bad:
        raise InputError(f"{path}: {where}: entry `{bad[0][:80]}` is not a {digits}-digit hex digest as "
                         f"match={entry.match} needs ({len(bad)} of the first {len(sample)} entries); check `match`")


def _limit_memory(con: duckdb.DuckDBPyConnection, cfg, spill_name: str) -> None:
    """engine.join_memory_limit for the joins of `con`, spilling to data/.tmp/SPILL_NAME."""
    spill = TMP / spill_name
    spill.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = {sql_string(cfg.engine.join_memory_limit)}")
    con.execute(f"SET temp_directory = {sql_string(spill)}")


def _streamed_join(con: duckdb.DuckDBPyConnection, sql: str, path, where: str) -> None:
    """Run `sql`, an inner join whose build side (the right one) is the part and whose probe
    side is a list streamed from its file, with the plan kept as written: DuckDB's optimizer
    would build on the list (it cannot estimate a CSV's rows), holding 20M hashes in memory
    instead of the part's 2M (docs/benchmarks.md). A list it cannot read is an error naming it."""
    try:
        con.execute("SET disabled_optimizers = 'join_order,build_side_probe_side'")
        con.execute(sql)
        con.execute("RESET disabled_optimizers")
    except duckdb.Error as exc:
        raise InputError(f"{path}: {where}: cannot read it: {str(exc).splitlines()[0]}") from None


def apply(con: duckdb.DuckDBPyConnection, cfg, relation: str, out_view: str, part: int) -> list[dict]:
    """Create view `out_view`: `relation`'s rows plus one boolean `_blocked_<name>` column per
    list of prepare.blocklists (the rule `blocklist_<name>` drops its true rows). Returns, per
    list, {name, match, path, entries matched}: what prepare records in its stats."""
    lists = cfg.prepare.blocklists
    if not lists:
        con.execute(f"CREATE TEMP VIEW {out_view} AS SELECT * FROM {relation}")
        return []
    _limit_memory(con, cfg, f"duckdb_blocklists_{part}")
    columns, found = [], []
    for i, entry in enumerate(lists):
        where = f"prepare.blocklists.{i} (`{entry.name}`, match={entry.match})"
        path = local_copy(entry.path)
        entries = _entries_sql(con, entry, path, where)
        _check_sample(con, entries, entry, path, where)
        table = f"_matched_{i}"
        side = PART_SIDE[entry.match]
        # DISTINCT: a list may repeat an entry
        _streamed_join(con, f"""CREATE TEMP TABLE {table} AS SELECT DISTINCT r._row FROM ({entries}) l JOIN
                                (SELECT _row, {side} AS h FROM {relation}
                                 WHERE {NEEDS_COLUMN[entry.match]} IS NOT NULL) r
                                ON l.h = r.h""", path, where)
        matched = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        found.append({"name": entry.name, "match": entry.match, "path": entry.path, "matched_rows": int(matched)})
        columns.append(f"(r._row IN (SELECT _row FROM {table})) AS {blocked_column(entry.name)}")
    con.execute("RESET memory_limit")
    con.execute(f"CREATE TEMP VIEW {out_view} AS SELECT r.*, {', '.join(columns)} FROM {relation} r")
    return found


def screen_part(con: duckdb.DuckDBPyConnection, cfg, shard_tables: list[Path], part: int) -> tuple[str, list[dict]]:
    """Match select.image_blocklists against the hashes of part `part`'s downloaded images (the
    shard tables img2dataset wrote). Returns (a temp table of (key, list), one row per matched
    sample and list, in key then list order; per list {name, match, path, matched_samples})."""
    from laionbuild.project.layout import KEY_COLUMN

    lists = cfg.select.image_blocklists
    con.execute("CREATE TEMP TABLE _image_blocked (key VARCHAR, list VARCHAR, _list INTEGER)")
    if not lists or not shard_tables:
        return "(SELECT key, list FROM _image_blocked)", [
            {"name": e.name, "match": e.match, "path": e.path, "matched_samples": 0} for e in lists]
    import pyarrow.parquet as pq

    _limit_memory(con, cfg, f"duckdb_image_blocklists_{part}")
    files = f"[{', '.join(sql_string(f) for f in shard_tables)}]"
    found = []
    for i, entry in enumerate(lists):
        where = f"select.image_blocklists.{i} (`{entry.name}`, match={entry.match})"
        column = IMAGE_HASH[entry.match]
        lacking = [f for f in shard_tables if column not in pq.read_schema(f).names]
        if lacking:
            raise InputError(f"{lacking[0]}: {where}: img2dataset wrote no `{column}` column (the part was downloaded "
                             f"with another download.compute_hash): set download.compute_hash={column} and rebuild "
                             "the download")
        path = local_copy(entry.path, "select.image_blocklists", IMAGE_INPUT_FILE)
        entries = _entries_sql(con, entry, path, where)
        _check_sample(con, entries, entry, path, where)
        # the part (its downloaded samples' digests) the build side, the list the probe side
        _streamed_join(con, f"""INSERT INTO _image_blocked SELECT DISTINCT r.key, {sql_string(entry.name)}, {i}
                            FROM ({entries}) l JOIN
                            (SELECT CAST({_quote(KEY_COLUMN)} AS VARCHAR) AS key, lower({_quote(column)}) AS h
                             FROM read_parquet({files}, union_by_name=true)
                             WHERE status = 'success' AND {_quote(column)} IS NOT NULL) r
                            ON l.h = r.h""", path, where)
        matched = con.execute(f"SELECT count(*) FROM _image_blocked WHERE _list = {i}").fetchone()[0]
        found.append({"name": entry.name, "match": entry.match, "path": entry.path, "matched_samples": int(matched)})
    con.execute("RESET memory_limit")
    return "(SELECT key, list FROM _image_blocked ORDER BY key, _list)", found

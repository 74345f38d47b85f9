"""engine=local (DuckDB) and engine=spark (pyspark, local[2]) give the same prepared and
deduplicated metadata: same rows, same keys, same order, same types, same funnel counts."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch

from .conftest import BIN, new_project, spark_jobs
from .standins import write_laion400m, write_mscoco

FAST = ["embed.model=laionbuild-tiny", "embed.pretrained=random"]  # the tiny test model has no pretrained tags


def outputs(project, parts, stages=("prepared", "deduped")):
    tables, counts = {}, {}
    for stage_dir in stages:
        for p in parts:
            tables[stage_dir, p] = pq.read_table(project / f"data/{stage_dir}/part_{p}/metadata.parquet")
            counts[stage_dir, p] = json.loads((project / f"data/{stage_dir}/part_{p}/stats.json").read_text())
    return tables, counts


def on_spark(project, session, overrides):
    """Build up to dedup with engine=spark on the test session's SparkSession, in-process."""
    jobs = spark_jobs(session)
    project.build_in_process(*overrides, "engine=spark", "engine.master=active", until="dedup")
    assert spark_jobs(session) > jobs  # it ran on Spark


def assert_same(local, spark, parts, stages=("prepared", "deduped")):
    local_tables, local_counts = outputs(local, parts, stages)
    spark_tables, spark_counts = outputs(spark, parts, stages)
    assert local_counts == spark_counts
    for key, table in local_tables.items():
        other = spark_tables[key]
        assert table.schema.names == other.schema.names, key
        assert [f.type for f in table.schema] == [f.type for f in other.schema], key
        assert table.to_pylist() == other.to_pylist(), key


def test_laion400m_with_id_list_and_filters(tmp_path, shared_spark):
    source = tmp_path / "laion"
    data = write_laion400m(source)
    torch.save([torch.tensor([r["SAMPLE_ID"] for r in data[p][::2]]) for p in range(3)], tmp_path / "ids.pth")
    overrides = ["recipe=laion_face", f"source.base_url={source}", f"source.ids_url={tmp_path / 'ids.pth'}",
                 "subset.parts=[2,0,1]", "prepare.nsfw.drop=[NSFW,UNSURE]", "prepare.min_caption_words=2",
                 "prepare.max_aspect_ratio=4", *FAST]
    local = new_project(tmp_path / "local")
    local.build(*overrides, "engine=local", "--stage", "dedup")
    spark = new_project(tmp_path / "spark")
    on_spark(spark, shared_spark, overrides)
    assert_same(local, spark, [2, 0, 1])
    # part order 2, 0, 1: duplicates of part 2's rows were dropped from parts 0 and 1
    assert sum(json.loads((local / f"data/deduped/part_{p}/stats.json").read_text())["counts"]["after_dedup"]
               for p in (0, 1, 2)) < sum(pq.read_metadata(local / f"data/prepared/part_{p}/metadata.parquet").num_rows
                                         for p in (0, 1, 2))


def test_mscoco_merged_captions_and_switching_engine_reruns_nothing(tmp_path, shared_spark):
    write_mscoco(tmp_path / "coco", images=20)
    overrides = ["recipe=mscoco_face", f"source.base_url={tmp_path / 'coco'}", *FAST]
    local = new_project(tmp_path / "local")
    local.build(*overrides, "--stage", "dedup")
    spark = new_project(tmp_path / "spark")
    on_spark(spark, shared_spark, overrides)
    assert_same(local, spark, [0])
    assert all(len(c) == 5 for c in pq.read_table(spark / "data/deduped/part_0/metadata.parquet")["captions"].to_pylist())
    assert local.build(*overrides, "engine=spark", "--stage", "dedup").ran == []  # engine: not a stage parameter


CAPTIONS = [
    ("en", "a photograph of a small dog playing in the garden with a red ball"),
    ("fr", "une photo d'un petit chien qui joue dans le jardin avec une balle rouge"),
    ("de", "ein Foto von einem kleinen Hund, der im Garten mit einem roten Ball spielt"),
    ("en", "the old lighthouse on the rocky coast at sunset"),
    ("es", "una fotografía de un perro pequeño jugando en el jardín con una pelota roja"),
    ("en", "black and white portrait of a smiling woman wearing a hat"),
    (None, ""),
]


def test_language_filter_on_a_csv_source(tmp_path, shared_spark):
    source = tmp_path / "crawl"
    source.mkdir()
    lines = ["url,caption,lang_truth"] + [f'http://x.example/{i}.jpg,"{c}",{lang}' for i, (lang, c) in
                                        enumerate(CAPTIONS)]
    (source / "part-00000.csv").write_text("\n".join(lines) + "\n")
    overrides = ["recipe=mscoco_face", f"source.base_url={source}", "source.format=csv",
                 "source.part_pattern='part-{part:05d}.csv'", "source.columns={url: url, caption: caption}",
                 "prepare.languages=[en]", "prepare.min_language_score=0.5", *FAST]
    local = new_project(tmp_path / "local")
    local.build(*overrides, "--stage", "dedup")
    spark = new_project(tmp_path / "spark")
    on_spark(spark, shared_spark, overrides)
    assert_same(local, spark, [0])
    kept = pq.read_table(local / "data/prepared/part_0/metadata.parquet").to_pylist()
    assert [r["caption"] for r in kept] == [c for lang, c in CAPTIONS if lang == "en"]
    assert {r["language"] for r in kept} == {"en"} and {r["lang_truth"] for r in kept} == {"en"}
    counts = json.loads((local / "data/prepared/part_0/stats.json").read_text())["counts"]
    assert counts["rows_in"] == len(CAPTIONS) and counts["after_language"] == 3


def test_a_stage_runs_under_spark_submit_on_its_session(tmp_path):
    """`spark-submit laionbuild/engine/spark_submit.py stage …` with engine.master=active: the stage uses
    the session spark-submit configured, and gives what the local engine gives."""
    import laionbuild.engine.spark_submit

    write_mscoco(tmp_path / "coco", images=12)
    overrides = ["recipe=mscoco_face", f"source.base_url={tmp_path / 'coco'}", *FAST]
    local = new_project(tmp_path / "local")
    local.build(*overrides, "--stage", "prepare")
    submitted = new_project(tmp_path / "submitted")
    submitted.build(*overrides, "engine=spark", "engine.master=active", "--stage", "fetch")
    result = submitted.run(str(BIN / "spark-submit"), "--master", "local[1]", "--conf", "spark.ui.enabled=false",
                           laionbuild.engine.spark_submit.__file__, "stage", "prepare", "--part", "0")
    assert "prepared part 0 (spark engine)" in result.output
    assert_same(local, submitted, [0], stages=("prepared",))

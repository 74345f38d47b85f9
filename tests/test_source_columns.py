"""tag.source_columns: a source's own scores carried into the tag table as they are, for the
select rules to use without recomputing them; a `uid` column listed there makes select write the
selected uids in DataComp's format (data/selected/uids.npy: sorted `u8,u8`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laionbuild.recipe.errors import InputError
from laionbuild.recipe.schema import RecipeError, compose

from .conftest import ROOT
from .test_embeddings_only import write_laion2b_part


def with_uids(root, part: int, rng) -> list[str]:
    path = root / "laion2B-en-metadata" / f"metadata_{part:04d}.parquet"
    table = pq.read_table(path)
    uids = [f"{int(a):016x}{int(b):016X}" for a, b in zip(rng.integers(0, 2**63, table.num_rows),
                                                         rng.integers(0, 2**63, table.num_rows))]
    pq.write_table(table.append_column("uid", pa.array(uids)), path)
    return uids


def test_source_scores_are_tags_for_the_rules_and_the_selected_uids_are_written(project, tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "laion2B-en"
    parts = {p: write_laion2b_part(root, p, rows, rng) for p, rows in ((0, 30), (1, 45))}
    uids = {p: with_uids(root, p, rng) for p in parts}
    project.build_in_process("recipe=laion2b_en_emb", "subset.parts=[0,1]", f"source.base_url={root}",
                             "prepare.nsfw.drop=[]", "prepare.nsfw.drop_missing=false",
                             "tag.source_columns=[similarity,source_key,uid]", "+select.min_scores={similarity:0.3}",
                             "+select.top_fraction={similarity:0.6}", until="select")
    similarity = np.concatenate([np.array(parts[p][0]["similarity"]) for p in (0, 1)])
    every_uid = np.array(uids[0] + uids[1])
    threshold = -np.sort(-similarity)[int(len(similarity) * 0.6)]
    keep = (similarity >= 0.3) & (similarity >= threshold)
    assert 0 < keep.sum() < len(keep)

    tags = pq.read_table(project / "data/tags/part_1/tags.parquet")
    assert tags["similarity"].to_pylist() == parts[1][0]["similarity"]  # as they are, in build order
    assert tags["source_key"].to_pylist() == parts[1][0]["key"] and tags["uid"].to_pylist() == uids[1]
    selected = pq.read_table(project / "data/selected/selected.parquet")["key"].to_pylist()
    assert selected == [f"{p:05d}{i:09d}" for p in (0, 1) for i in range(len(uids[p]))
                        if keep[i + (len(uids[0]) if p else 0)]]
    written = np.load(project / "data/selected/uids.npy")
    want = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in every_uid[keep]], np.dtype("u8,u8"))
    want.sort()
    assert written.dtype == np.dtype("u8,u8") and written.tobytes() == want.tobytes()


def test_a_source_column_the_part_lacks_is_named(project, tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "laion2B-en"
    write_laion2b_part(root, 0, 10, rng)
    with pytest.raises(InputError, match=r"metadata\.parquet: no column `clip_l14_similarity_score` "
                                         r"\(tag\.source_columns\); the part's metadata has \['key', 'caption'"):
        project.build_in_process("recipe=laion2b_en_emb", "subset.parts=[0]", f"source.base_url={root}",
                                 "tag.source_columns=[clip_l14_similarity_score]", until="tag")


def test_a_source_column_named_like_a_computed_tag_is_refused_at_compose():
    with pytest.raises(RecipeError, match=r"tag\.source_columns.*`width` is a tag the tag stage computes"):
        compose(["tag.source_columns=[width]"], conf_dir=ROOT / "conf")
    with pytest.raises(RecipeError, match=r"select\.min_scores\.similarity.*nor in tag\.source_columns"):
        compose(["+select.min_scores={similarity:0.3}"], conf_dir=ROOT / "conf")

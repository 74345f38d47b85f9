"""Where every stage reads and writes. `dvc.yaml` declares the same paths.

Per-part stages write one directory per part (`data/<stage dir>/part_N/`), each with a
`stats.json` of the counts that stage contributes to the funnel. Global stages write one
directory. Unfinished work lives under `data/.tmp/` (atomic renames) and `data/.work/`
(resumable scratch, e.g. img2dataset's shards of a part being downloaded); both are ignored by
git and DVC and never sit inside a stage's dependency.
"""

from __future__ import annotations

from pathlib import Path

KEY_COLUMN = "laionbuild_key"  # our key per row, carried through img2dataset as an additional column
DATA = Path("data")
TMP = DATA / ".tmp"
WORK = DATA / ".work"

INPUTS = DATA / "inputs"  # fingerprints of the files stages read from outside DVC's sight (project/inputs.py)
DEDUPED = DATA / "deduped"
CONSOLIDATED = DATA / "consolidated"
# stage -> directory under data/ holding one part_N/ per part (dedup is global but writes per part)
PART_DIRS = {
    "fetch": DATA / "raw",
    "prepare": DATA / "prepared",
    "dedup": DEDUPED,
    "download": DATA / "images",
    "screen": DATA / "screened",
    "faces": DATA / "faces",
    "watermark": DATA / "watermark",
    "embed": DATA / "embed",
    "tag": DATA / "tags",
}
PER_PART_STAGES = ("fetch", "prepare", "download", "screen", "faces", "watermark", "embed", "tag")
# `inputs` runs first on every build (always_changed): it only checks files, cheaply
GLOBAL_STAGES = ("inputs", "consolidate", "dedup", "neardup", "clusters", "select", "assemble", "export", "index", "report",
                 "card")
# pipeline order: inputs, consolidate, fetch, prepare, dedup, download, screen, faces, watermark, embed,
# tag, neardup, clusters, select, assemble, export, index, report, card
STAGES = GLOBAL_STAGES[:2] + PER_PART_STAGES[:2] + ("dedup",) + PER_PART_STAGES[2:] + GLOBAL_STAGES[3:]
# the stages of a split build's root graph (laionbuild/project/splits.py), not of the standard
# dvc.yaml: they run at the repository's root, after every split's graph
SPLIT_STAGES = ("union",)

# Stages whose outputs changed layout in a way their inputs and params do not show: dvc.yaml
# calls them with `--layout N`, so a new layout changes the stage's cmd and DVC reruns it (and
# its run-cache, keyed by cmd too, never restores an output of the old layout). 2: assemble's
# data/embeddings files numbered with six digits (autofaiss reads them in name order).
OUTPUT_LAYOUTS = {"assemble": 2}


def output_layout_error(stage: str, found: int | None) -> str | None:
    """What is wrong with a dvc.yaml whose `stage` cmd asks for output layout `found` (None: no
    --layout), or None when it asks for the one this laionbuild writes."""
    writes = OUTPUT_LAYOUTS.get(stage)
    if writes is None or found == writes:
        return None
    return (f"dvc.yaml runs `{stage}` for output layout {found or 1}, and this laionbuild writes layout {writes}: "
            f"take dvc.yaml's `{stage}` entry from the shipped one (`cmd: laionbuild stage {stage} --layout {writes}`; "
            "docs/stages.md), so that DVC rebuilds it and what follows")

NEARDUP = DATA / "neardup"
CLUSTERS = DATA / "clusters"
SELECTED = DATA / "selected"
DATASET = DATA / "dataset"
EMBEDDINGS = DATA / "embeddings"
EXPORT = DATA / "export"
INDEX = DATA / "index"
METRICS = DATA / "metrics"
FUNNEL = METRICS / "funnel.json"
FUNNEL_STEPS = METRICS / "funnel_steps.json"
INDEX_METRICS = METRICS / "index.json"
INDEX_FILTERED_METRICS = METRICS / "index_filtered.json"  # report: the index under the selection filter
HISTOGRAMS = METRICS / "hist"  # one {bin, samples, selected} file per tag (DVC plots)
LICENCES = METRICS / "licences.json"
LANGUAGES = METRICS / "languages.json"  # tagged and kept per language of the samples' `language` column
REPORT = DATA / "report"  # index.html: the build's report, self-contained
CARD_MD = DATA / "card.md"
CARD_JSON = DATA / "card.json"
STATS_FILE = "stats.json"


def part_dir(stage: str, part: int) -> Path:
    return PART_DIRS[stage] / f"part_{part}"


def embed_dir(part: int, model: str | None = None) -> Path:
    """A part's embeddings by one model: embed.model's in data/embed/part_N, an
    embed.extra_models entry's in data/embed/part_N/models/NAME (same rows, same order)."""
    base = part_dir("embed", part)
    return base if model is None else base / "models" / model


def embeddings_dir(model: str | None = None) -> Path:
    """The selected samples' embeddings (assemble): embed.model's in data/embeddings, an
    extra model's in data/embeddings/models/NAME."""
    return EMBEDDINGS if model is None else EMBEDDINGS / "models" / model


def part_of(path: Path) -> int | None:
    """`data/raw/part_7` -> 7; None for anything else."""
    name = path.name
    if name.startswith("part_") and name[5:].isdigit():
        return int(name[5:])
    return None

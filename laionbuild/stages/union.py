"""union: a split build's one dataset over its splits' builds (laionbuild/project/splits.py,
`recipe=laion5b`; docs/multilingual.md). Runs at the root of the repository, on its params.yaml
(`recipe`, `splits`), and reads only what each split's select, report and card wrote:

- `data/union/NN_<split>.parquet`, one file per split (NN its place in the recipe's order, so
  name order is split order and `pd.read_parquet("data/union")` reads them all): (split, part,
  key) of the split's selected samples in its build order. One file a split, so a change to one
  split rewrites all but DVC caches only the changed split's file (at LAION-5B ~80 GB of keys
  otherwise cached again whole per change). Keys are the splits' own (5-digit part +
  9-digit row), so the same key can be in two splits: (split, key) is unique, and a row's
  images, embeddings and tags are in splits/<split>/data/ under that key. Streamed one record
  batch at a time: memory follows a batch, not the 5.85 billion rows.
- `data/metrics/funnel.json` (DVC metrics): the funnel of every split (its report's steps) and
  their sum (`all`); `data/metrics/languages.json` (DVC plot): every split's per-language rows
  (a split without a language column has none) with a `split` field.
- `data/card.md` / `data/card.json`: the splits (recipe, source, parts, image model, text
  encoder, thresholds, selected), the funnel with a column per split, the per-language table.

No index over the union: each split's build has its own (LAION published one per split too).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, atomic_write_text, read_json, write_json
from laionbuild.project.layout import CARD_JSON, CARD_MD, DATA, FUNNEL, LANGUAGES
from laionbuild.project.splits import split_dir

UNION = DATA / "union"
SCHEMA = pa.schema([("split", pa.string()), ("part", pa.int64()), ("key", pa.string())])


def union_file(index: int, name: str) -> str:
    return f"{index:02d}_{name}.parquet"


def _selected(out, names) -> dict[str, int]:
    counts = {}
    for index, name in enumerate(names):
        selected = pq.ParquetFile(split_dir(name) / "data/selected/selected.parquet")
        counts[name] = 0
        with pq.ParquetWriter(out / union_file(index, name), SCHEMA, compression="zstd") as writer:
            for batch in selected.iter_batches(columns=["part", "key"], batch_size=1 << 20):
                writer.write_table(pa.table({"split": pa.repeat(pa.scalar(name, pa.string()), batch.num_rows),
                                             "part": batch.column("part").cast(pa.int64()),
                                             "key": batch.column("key").cast(pa.string())}, schema=SCHEMA))
                counts[name] += batch.num_rows
    return counts


def _steps(names) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The funnel's steps (every split's, in their order) and {split: {step: rows}}."""
    order: list[str] = []
    funnels = {}
    for name in names:
        rows = read_json(split_dir(name) / "data/metrics/funnel_steps.json")
        funnels[name] = {r["step"]: r["rows"] for r in rows}
        order += [r["step"] for r in rows if r["step"] not in order]
    return order, funnels


def _split_row(name: str, recipe_name: str, card: dict) -> dict:
    recipe = card["recipe"]
    embed, select = recipe["embed"], recipe["select"]
    text = card["models"]["embed.model"].get("text_model")
    return {"split": name, "recipe": recipe_name, "source": recipe["source"]["name"],
            "parts": recipe["subset"]["parts"], "image_model": f"{embed['model']}/{embed['pretrained']}",
            "text_model": ({k: text[k] for k in ("path", "kind", "dim", "md5") if k in text} if text else None),
            "min_clip_similarity": select["min_clip_similarity"],
            "min_clip_similarity_by_language": select.get("min_clip_similarity_by_language") or {},
            "selected": card["samples"], "untrained_weights": card["untrained_weights"]}


def run(recipe) -> None:
    names = list(recipe.splits)
    with atomic_dir(UNION) as out:
        counts = _selected(out, names)
    order, funnels = _steps(names)
    funnel = {name: funnels[name] for name in names}
    funnel["all"] = {step: sum(funnels[n].get(step, 0) for n in names) for step in order}
    write_json(FUNNEL, funnel)
    languages = [{"split": name, **row} for name in names
                 for row in read_json(split_dir(name) / "data/metrics/languages.json")]
    write_json(LANGUAGES, languages)
    cards = {name: read_json(split_dir(name) / "data/card.json") for name in names}
    splits = [_split_row(name, recipe.splits[name], cards[name]) for name in names]
    for row in splits:  # the split's selection as its card counted it is the one in the union
        assert row["selected"] == counts[row["split"]], (row, counts)
    card = {"name": recipe.recipe.name, "description": recipe.recipe.description, "samples": sum(counts.values()),
            "splits": splits, "funnel": {"steps": order, **funnel}, "languages": languages,
            "untrained_weights": any(r["untrained_weights"] for r in splits),
            "index": "one per split: splits/<split>/data/index (no index over the union)"}
    atomic_write_text(CARD_JSON, json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(CARD_MD, markdown(card))


def _cell(value) -> str:
    return "—" if value is None else str(value)


def markdown(card: dict) -> str:
    names = [s["split"] for s in card["splits"]]
    lines = [f"# {card['name']}", "", card["description"], "",
             f"**{card['samples']:,} samples** over {len(names)} splits, each its own build in `splits/<split>/` "
             "(its recipe `params.yaml`, its own card, report and index); `data/union/` lists (split, part, key), "
             "one file per split.", ""]
    if card["untrained_weights"]:
        lines += ["**Warning: untrained (random) model weights were used in a split: not a real dataset.**", ""]
    lines += ["## Splits", "", "| split | recipe | source | parts | image model | captions embedded by | "
              "min similarity | per language | selected |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in card["splits"]:
        text = (f"`{s['text_model']['path']}` ({s['text_model']['kind']})" if s["text_model"]
                else "the image model's text tower")
        by_language = ", ".join(f"{k}: {v}" for k, v in sorted(s["min_clip_similarity_by_language"].items())) or "—"
        lines.append(f"| {s['split']} | {s['recipe']} | {s['source']} | {s['parts']} | {s['image_model']} | {text} | "
                     f"{_cell(s['min_clip_similarity'])} | {by_language} | {s['selected']:,} |")
    funnel = card["funnel"]
    lines += ["", "## Funnel", "", "| step | " + " | ".join(names) + " | all |",
              "| --- |" + " ---: |" * (len(names) + 1)]
    for step in funnel["steps"]:
        lines.append(f"| {step} | " + " | ".join(_cell(funnel[n].get(step)) for n in names)
                     + f" | {funnel['all'][step]} |")
    if card["languages"]:
        lines += ["", "## Per language", "", "| split | language | tagged | selected | share kept |",
                  "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['split']} | {r['language']} | {r['tagged']} | {r['selected']} | {r['share']:.3f} |"
                  for r in card["languages"]]
    lines += ["", "## Index", "", "One per split (`splits/<split>/data/index`, `laionbuild query` in that folder); "
              "none over the union.", ""]
    return "\n".join(lines)

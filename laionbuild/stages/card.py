"""card: the dataset card of a build, `data/card.md` (for people) and `data/card.json` (for
tools): the composed recipe (but the engine and the speed knobs, which change no output), the
source files with their sizes and md5s, the tool and model versions (and a warning when the
weights are untrained), the funnel, the licence breakdown of the selected samples, the sample
count, the git commit, and how to reproduce the build. It depends on exactly what it prints, so
switching the engine or a speed knob does not rerun it."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path

import yaml

from laionbuild.project.atomic import atomic_write_text, read_json
from laionbuild.project.layout import CARD_JSON, CARD_MD, FUNNEL, embed_dir, part_dir
from laionbuild.project.outputs import licences
from laionbuild.recipe.schema import without_speed_knobs

TOOLS = ("laionbuild", "img2dataset", "clip-retrieval", "open_clip_torch", "autofaiss", "faiss-cpu", "torch",
         "dvc", "duckdb", "pyarrow", "hydra-core", "pyspark")


def _version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def run(*args):
        proc = subprocess.run(["git", *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--", "conf", "dvc.yaml", "params.yaml")
    return {"commit": commit, "recipe_files_modified": bool(dirty)}


def run(cfg) -> None:
    # what decides the outputs: the engine and the speed knobs (which change none, and which
    # dvc.yaml does not track for this stage either) are left to params.yaml
    recipe = without_speed_knobs(yaml.safe_load(Path("params.yaml").read_text()))
    funnel = read_json(FUNNEL)
    sources = []
    for part in cfg.subset.parts:
        fetched = read_json(part_dir("fetch", part) / "fetch.json")
        entry = {"part": part, "url": fetched["url"], "size": fetched["size"], "md5": fetched["md5"]}
        if "image_embeddings" in fetched:
            e = fetched["image_embeddings"]
            entry["image_embeddings"] = {"url": e["url"], "size": e["size"], "md5": e["md5"]}
        sources.append(entry)
    first = cfg.subset.parts[0]
    models = {"embed.model": read_json(embed_dir(first) / "model.json")}
    for name in cfg.embed.extra_models:
        models[f"embed.extra_models.{name}"] = read_json(embed_dir(first, name) / "model.json")
    untrained = any(m.get("untrained") for m in models.values())
    safety = _safety_lists(cfg, funnel)
    git = _git()
    card = {
        "name": cfg.recipe.name,
        "description": cfg.recipe.description,
        "samples": funnel.get("selected"),
        # false: a sweep point, its selection only (no data/dataset shards yet: `laionbuild materialize`)
        "materialized": cfg.assemble.materialize,
        "untrained_weights": untrained,
        "git": git,
        "recipe": recipe,
        "sources": sources,
        "tools": {t: _version(t) for t in TOOLS},
        "models": models,
        "funnel": {k: v for k, v in funnel.items() if k != "parts"},
        "licences": licences(cfg),
        "safety_lists": safety,
        "reproduce": [f"git clone <this repo> && cd <it> && git checkout {git['commit'] or '<commit>'}",
                      "dvc pull            # the build's outputs from its DVC remote, byte-identical",
                      "laionbuild build    # or rebuild them from the sources (params.yaml is the recipe)"],
    }
    atomic_write_text(CARD_JSON, json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(CARD_MD, markdown(card))


def _safety_lists(cfg, funnel: dict | None = None) -> list[dict]:
    """prepare.blocklists, select.image_blocklists and tag.unsafe_keywords' keyword file, each
    with the fingerprint the inputs check recorded (data/inputs/blocklists.json,
    image_blocklists.json, keywords.json): size and md5 of a local file, what the store says
    (ETag...) of a remote one; and, for a hash list, how many rows (samples) it matched, from
    the funnel: a count, never what matched."""
    from laionbuild.project.inputs import recorded_inputs

    funnel = funnel or {}
    lists = recorded_inputs("blocklists.json")
    matched = funnel.get("blocklist_matches", {})
    out = [{"name": e.name, "use": f"prepare.blocklists ({e.match})", "path": e.path, "content": lists.get(e.path),
            "matched": matched.get(e.name)} for e in cfg.prepare.blocklists]
    images = recorded_inputs("image_blocklists.json")
    matched = funnel.get("image_blocklist_matches", {})
    out += [{"name": e.name, "use": f"select.image_blocklists ({e.match})", "path": e.path,
             "content": images.get(e.path), "matched": matched.get(e.name)} for e in cfg.select.image_blocklists]
    if (keywords := cfg.tag.unsafe_keywords) is not None:
        rule = cfg.select.unsafe_keywords
        use = f"select.unsafe_keywords ({rule.score} > {rule.above})" if rule else "tag.unsafe_keywords (no select rule)"
        out.append({"name": "keywords", "use": use, "path": keywords,
                    "content": recorded_inputs("keywords.json").get(keywords)})
    return out


def _content(fp: dict | None) -> str:
    if not fp:
        return "not checked"
    return ", ".join(f"{k} `{v}`" for k, v in sorted(fp.items()))


def markdown(card: dict) -> str:
    lines = [f"# {card['name']}", "", card["description"] or "", ""]
    if card["untrained_weights"]:
        lines += ["> **WARNING: UNTRAINED weights** (`pretrained: random`): embeddings, CLIP similarities, "
                  "score tags and the index are not meaningful.", ""]
    if not card.get("materialized", True):
        lines += ["> **Not materialised** (`assemble.materialize: false`, a sweep point): the selection is "
                  "`data/selected/selected.parquet`; `laionbuild.read('.')` reads its samples from the download's "
                  "shards; `laionbuild materialize` builds data/dataset, data/embeddings, data/export and data/index.",
                  ""]
    lines += [f"- samples: **{card['samples']}**",
              f"- git commit: `{card['git']['commit']}`" + (" (recipe files modified since)" if
                                                           card["git"]["recipe_files_modified"] else ""), ""]
    lines += ["## Funnel", "", "| step | rows |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in card["funnel"].items() if isinstance(v, (int, float))]
    lines += ["", "## Licences of the selected samples", "", "| licence | samples |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in card["licences"].items()]
    if card["safety_lists"]:
        lines += ["", "## Safety lists", "", "| list | used by | file | content | matched |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['use']} | {s['path']} | {_content(s['content'])} | "
                  f"{'' if s.get('matched') is None else s['matched']} |" for s in card["safety_lists"]]
    lines += ["", "## Sources", "", "| part | file | bytes | md5 |", "| --- | --- | --- | --- |"]
    for s in card["sources"]:
        lines.append(f"| {s['part']} | {s['url']} | {s['size']} | `{s['md5']}` |")
        if "image_embeddings" in s:
            e = s["image_embeddings"]
            lines.append(f"| {s['part']} | {e['url']} | {e['size']} | `{e['md5']}` |")
    lines += ["", "## Models", ""]
    for name, m in card["models"].items():
        lines.append(f"- `{name}`: {m.get('architecture')} ({m.get('pretrained')})"
                     + (" — UNTRAINED" if m.get("untrained") else ""))
        if text := m.get("text_model"):  # embed.text_model: the captions' encoder, paired with the image tower
            lines.append(f"  - captions embedded by `embed.text_model`: {text['path']} ({text['kind']}, "
                         f"{text['dim']} dimensions, files md5 `{text['files_md5']}`)")
    lines += ["", "## Tools", ""] + [f"- {t} {v}" for t, v in card["tools"].items() if v]
    lines += ["", "## Reproduce", "", "```bash"] + card["reproduce"] + ["```", "",
              "## Recipe (params.yaml)", "",
              "The engine and the speed-only settings (threads, batch sizes, memory caps), which change no "
              "output, are not shown: they are in params.yaml.", "",
              "```yaml", yaml.safe_dump(card["recipe"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)

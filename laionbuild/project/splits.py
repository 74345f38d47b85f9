"""Split builds (`recipe=laion5b`; docs/multilingual.md): several builds, each of its own recipe,
in one DVC repository, and their union.

    params.yaml, dvc.yaml        the split build's recipe (`recipe`, `splits`) and the `union` stage
    splits/<split>/params.yaml   that split's composed recipe (its recipe + the overrides)
    splits/<split>/dvc.yaml      the standard stage graph (the shipped dvc.yaml: wdir is its folder,
                                 so every stage runs there unchanged, on that folder's params.yaml)

DVC collects every dvc.yaml of the repository into one graph: `dvc repro` at the root builds
the splits and then the union, and tracks each split's params on that split's stages only (a
change to one split's text encoder re-embeds that split). Keys are the splits' own (5-digit
part + 9-digit row): the union tells them apart by a `split` column. Paths in a split's recipe
(weights, lists, the text encoder) resolve in its folder, as its stages see them: compose
checks them from there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from laionbuild.project.atomic import atomic_write_text
from laionbuild.recipe.errors import RecipeError

SPLITS = Path("splits")
# the files a split folder needs of the project template, besides its params.yaml
SPLIT_FILES = ("dvc.yaml", ".gitignore", ".dvcignore")
# what `union` reads of each split's outputs (relative to its folder): dvc.yaml deps
SPLIT_OUTPUTS = ("data/selected", "data/card.json", "data/metrics/funnel_steps.json", "data/metrics/languages.json")
# outputs of a split's graph that no stage reads (`export`'s): deps of `union` too, never read,
# because a plain `dvc repro` builds the stages of the dvc.yaml where it runs and what they depend
# on -- without these the splits' `export` stages would never run from the root
SPLIT_SINKS = ("data/export",)
ROOT_MARK = "# laionbuild split build"  # first line of a split build's root dvc.yaml


def split_dir(name: str) -> Path:
    return SPLITS / name


def split_overrides(overrides: list[str], names) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every split, {split: its own}): `SPLIT.key=value` (also `~`, `+`, `++`)
    goes to SPLIT as `key=value`; `recipe=`/`recipe.*` are the split build's own."""
    common, own = [], {name: [] for name in names}
    for override in overrides:
        prefix = override[:len(override) - len(override.lstrip("~+"))]
        key = override.lstrip("~+").split("=", 1)[0]
        head, _, rest = key.partition(".")
        if key == "recipe" or head == "recipe":
            continue
        if head in own and rest:
            own[head].append(prefix + override.lstrip("~+")[len(head) + 1:])
        elif head in own:
            raise RecipeError(f"`{override}`: a split's override names a key under it ({head}.section.key=value)")
        else:
            common.append(override)
    return common, own


@contextlib.contextmanager
def _in(directory: Path):
    old = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(old)


def compose_splits(recipe, overrides: list[str], conf_dir: str | Path) -> dict:
    """{split: its composed Config}: `recipe=<its recipe>`, the overrides for every split, its
    own; composed in its folder (made here), so the checks of paths see what its stages will."""
    from laionbuild.recipe.schema import compose, compose_splits_recipe

    conf_dir = Path(conf_dir).resolve()
    common, own = split_overrides(overrides, recipe.splits)
    composed, made = {}, []
    try:
        for name, split_recipe in recipe.splits.items():
            if compose_splits_recipe([f"recipe={split_recipe}"], conf_dir) is not None:
                raise RecipeError(f"splits.{name}: recipe `{split_recipe}` is a split build itself (splits do not nest)")
            if not split_dir(name).exists():
                made.append(split_dir(name))
            split_dir(name).mkdir(parents=True, exist_ok=True)
            with _in(split_dir(name)):
                try:
                    composed[name] = compose([f"recipe={split_recipe}", *common, *own[name]], conf_dir=conf_dir)
                except RecipeError as exc:
                    raise RecipeError(f"split {name} (recipe {split_recipe}, in {split_dir(name)}/): {exc}") from None
    except RecipeError:
        for folder in made:  # (empty folders left behind would be stray splits to the next compose)
            folder.rmdir()
        if made and SPLITS.is_dir() and not any(SPLITS.iterdir()):
            SPLITS.rmdir()
        raise
    return composed


def root_dvc_yaml(names) -> str:
    """The root graph of a split build: the `union` stage over the splits' outputs."""
    deps = "".join(f"      - {split_dir(n).as_posix()}/{o}\n" for n in names for o in SPLIT_OUTPUTS + SPLIT_SINKS)
    return f"""{ROOT_MARK} (laionbuild/project/splits.py; written by `laionbuild compose`): the splits' graphs
# are splits/<split>/dvc.yaml (the standard one, run in that folder); this one holds their union.
stages:
  union:          # the splits' selected keys (a `split` column), one funnel with a column per split,
    cmd: laionbuild stage union    # the per-language table, one card
    deps:         # (each split's data/export is not read: there so that `dvc repro` here builds it)
{deps}    params: [recipe, splits]
    outs:
      - data/union
      - data/card.md:
          cache: false
      - data/card.json:
          cache: false
    metrics:
      - data/metrics/funnel.json:
          cache: false
    plots:
      - data/metrics/languages.json:   # per split and language: tagged, selected, share
          cache: false
          template: bar_horizontal_sorted
          x: share
          y: language
"""


def root_params_yaml(recipe) -> str:
    import dataclasses

    import yaml

    body = yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False, allow_unicode=True)
    return (f"# A split build (laionbuild/project/splits.py): each split's recipe is splits/<split>/params.yaml,\n"
            f"# its graph splits/<split>/dvc.yaml; dvc.yaml here holds their union.\n{body}")


def is_split_root(dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    return dvc_yaml.exists() and dvc_yaml.read_text().startswith(ROOT_MARK)


def check_root(recipe) -> None:
    """Refuse a root that holds a built recipe of one build, or split folders of other splits."""
    if Path("dvc.lock").exists() and not is_split_root():
        raise RecipeError(f"recipe {recipe.recipe.name} is a split build ({', '.join(recipe.splits)}), and this "
                          "repository's root holds a built recipe of one build (dvc.lock): build it in a repository "
                          "of its own (`laionbuild init DIR`)")
    stray = [p.name for p in SPLITS.iterdir() if p.is_dir() and p.name not in recipe.splits] if SPLITS.is_dir() else []
    if stray:
        raise RecipeError(f"{SPLITS}/ holds {stray}, not splits of recipe {recipe.recipe.name} "
                          f"({', '.join(recipe.splits)}): remove them (`dvc remove` their stages) first")


def write_layout(recipe, composed: dict, template: Path) -> None:
    """Write the split build's files: every split folder's params.yaml and template files, the
    root dvc.yaml and params.yaml. Refuses a root that holds a built recipe of one build."""
    from laionbuild.recipe.schema import to_yaml

    check_root(recipe)
    for name, cfg in composed.items():
        folder = split_dir(name)
        for file in SPLIT_FILES:
            atomic_write_text(folder / file, (template / file).read_text())
        atomic_write_text(folder / "params.yaml", to_yaml(cfg))
    atomic_write_text("dvc.yaml", root_dvc_yaml(list(composed)))
    atomic_write_text("params.yaml", root_params_yaml(recipe))


def load_root(path: str | Path = "params.yaml"):
    """A split build's root params.yaml, validated (laionbuild.recipe.schema.SplitsRecipe)."""
    import yaml

    from laionbuild.recipe.schema import SplitsRecipe
    from laionbuild.recipe.validate import typed

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return typed(SplitsRecipe, raw, str(path))

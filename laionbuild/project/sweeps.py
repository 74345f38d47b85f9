"""Sweeps and dataset repos.

- `laionbuild build -m a=1,2 b=x,y` expands Hydra's multirun grammar (comma lists, `range()`,
  `choice()`, glob) into the cartesian product of points and runs each point as one DVC
  experiment (`dvc exp run -n NAME -S override ...`), named after the overrides that vary. DVC's
  Hydra composition (`hydra.enabled` in `.dvc/config`, conf/ and config.yaml: ours) writes each
  point's params.yaml and the stages validate it; DVC's cache and run-cache make the points share
  every stage their params do not touch, so a threshold sweep costs one build plus K selections.
  A point is its selection only (`assemble.materialize=false`, SWEEP_DEFAULTS) unless the
  overrides set `assemble.materialize`: no image bytes copied, no vectors re-indexed per point;
  `laionbuild materialize` builds the point kept (`dvc exp apply NAME` first).
- `laionbuild init DIR` scaffolds a dataset repo of one's own (git + DVC with Hydra enabled),
  committed: by default only what a user edits or DVC must find in the repo -- conf/config.yaml
  (which searches the shipped conf/ after the repo's own: recipes of one's own need not copy
  ours, and an upgrade of laionbuild brings its fixed and new groups), dvc.yaml, the ignore
  files, the demo source, params.yaml; `--copy-conf` copies every shipped group and recipe
  instead (a frozen copy, edited in place, that no upgrade touches).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

from laionbuild.project.template import SHIPPED_CONF_SEARCHPATH, TEMPLATE_FILES
from laionbuild.recipe.errors import RecipeError

# conf/config.yaml of a dataset repo `laionbuild init` writes (unless --copy-conf)
OVERLAY_CONFIG = f"""\
# Entry point for `laionbuild compose` and for DVC's Hydra composition (`dvc exp run -S ...`).
# Recipes of your own: conf/recipe/NAME.yaml (groups: conf/<group>/NAME.yaml). This folder is
# searched first, then the conf/ laionbuild ships ({SHIPPED_CONF_SEARCHPATH}: every shipped group and
# recipe, not copied here), so a recipe can pick `/source: laion400m` and override a few values.
# Pick the default recipe here or with `recipe=NAME`; override any key with `group.key=value`.
defaults:
  - recipe: demo
  - _self_
hydra:
  searchpath:
    - {SHIPPED_CONF_SEARCHPATH}
"""


# what every point of `build -m` gets unless its overrides set the key: `++` sets it whether or not
# the composed recipe has it (a repo's own conf/assemble/default.yaml may predate the key)
SWEEP_DEFAULTS = {"assemble.materialize": "false"}


def override_key(override: str) -> str:
    """`+a.b=1`, `++a.b=1`, `~a.b`, `a.b=1` -> `a.b`."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def with_sweep_defaults(point: list[str]) -> list[str]:
    """A sweep point's overrides, then SWEEP_DEFAULTS' for the keys the point does not set."""
    given = {override_key(o) for o in point}
    return [*point, *(f"++{k}={v}" for k, v in SWEEP_DEFAULTS.items() if k not in given)]


def sweep_points(overrides: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Hydra multirun overrides -> (points, varying): every point's full override list, and for
    each point the overrides that vary across the sweep (its name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise RecipeError(f"build -m: {str(exc).splitlines()[0]}") from None
    axes, sweeping = [], []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            values = [f"{key}={v}" for v in override.sweep_string_iterator()]
            if not values:
                raise RecipeError(f"build -m: `{override.input_line}` sweeps over no value")
            axes.append(values)
            sweeping.append(True)
        else:
            axes.append([override.input_line])
            sweeping.append(False)
    points = [list(p) for p in itertools.product(*axes)]
    varying = [[o for o, s in zip(p, sweeping) if s] for p in points]
    return points, varying


def experiment_name(overrides: list[str]) -> str:
    """A DVC experiment (git ref) name for a sweep point: `select.min_clip_similarity=0.26` ->
    `min_clip_similarity=0.26`; characters git refuses become `-`."""
    short = [o.lstrip("+~") for o in overrides]
    short = [o.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + o.split("=", 1)[1] if "=" in o else o for o in short]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(short)).strip("-.")
    name = re.sub(r"\.{2,}", ".", name)
    return (name or "point")[:120]


def copy_template(template: Path, target: Path, names) -> None:
    """Copy the files and folders `names` of a project template into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = template / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        else:
            shutil.copy2(source, target / name)


def init_project(target: Path, template: Path, copy_conf: bool = False) -> None:
    """Scaffold a dataset repo at `target` from the project files at `template`: conf/config.yaml
    over the shipped conf/ (or, `copy_conf`, a copy of all of it) and the other template files."""
    if target.exists() and any(target.iterdir()):
        raise RecipeError(f"init: {target} exists and is not empty")
    copy_template(template, target, [n for n in TEMPLATE_FILES if copy_conf or n != "conf"])
    if not copy_conf:
        (target / "conf").mkdir()
        (target / "conf" / "config.yaml").write_text(OVERLAY_CONFIG)
    where = ("Recipes are in `conf/` (a copy of every shipped group and recipe)" if copy_conf else
             "Your recipes go in `conf/recipe/NAME.yaml`; laionbuild's shipped groups and recipes are searched after "
             "`conf/` (`hydra.searchpath` in `conf/config.yaml`), so a recipe of your own can pick them:\n\n"
             "```yaml\n# @package _global_\ndefaults:\n  - demo          # the shipped conf/recipe/demo.yaml, extended\n"
             "  - _self_\nrecipe:\n  name: mine\n"
             "select:\n  min_clip_similarity: 0.0\n```\n\nthen `laionbuild build recipe=mine`")
    (target / "README.md").write_text(
        "# A laionbuild dataset repo\n\n"
        f"{where}. `params.yaml` is the composed recipe DVC tracks.\n\n"
        "```bash\nlaionbuild build                                   # the demo recipe\n"
        "laionbuild build recipe=laion400m source.base_url=/data/laion400m-meta subset.parts=[0,1]\n"
        "laionbuild build -m select.min_clip_similarity=0.26,0.28,0.30   # one DVC experiment per point\n"
        "dvc exp show\n```\n")


def run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, text=True, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")


def materialized_params(text: str) -> str:
    """A point's params.yaml (`text`, as `dvc exp apply` puts it in the workspace) with
    `assemble.materialize: true` and every other value as it is: the point's own overrides are
    in its params.yaml, not recomposed from conf/ (which may have changed since, and whose
    overrides DVC does not record). The one line is edited in place, so the rest keeps its bytes
    (a point composed by `laionbuild compose` or DVC's Hydra composition gives the params.yaml a
    plain `laionbuild build` of the same overrides writes); the edit is checked by parsing both.
    Raises RecipeError when params.yaml does not say assemble.materialize: false."""
    import yaml

    params = yaml.safe_load(text) or {}
    assemble = params.get("assemble")
    if not isinstance(assemble, dict) or assemble.get("materialize", True) is not False:
        raise RecipeError("materialize: params.yaml does not say assemble.materialize: false (not a sweep point)")
    wanted = {**params, "assemble": {**assemble, "materialize": True}}
    block = re.search(r"^assemble:[ \t]*\n(?:(?:[ \t]+[^\n]*)?\n)*", text, flags=re.M)
    if block:
        body = re.sub(r"^([ \t]+materialize:[ \t]*)false([ \t]*(?:#[^\n]*)?)$", r"\g<1>true\g<2>",
                      block.group(0), count=1, flags=re.M)
        edited = text[:block.start()] + body + text[block.end():]
        if yaml.safe_load(edited) == wanted:
            return edited
    return yaml.safe_dump(wanted, sort_keys=False)  # (another layout: the values, re-dumped)

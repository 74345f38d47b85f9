"""The project template: the shipped `conf/` (every group and recipe), the `dvc.yaml` stage
graph, the `.dvcignore`/`.gitignore` templates and the demo source. A wheel carries them as
package data in `laionbuild/_template/` (setup.py copies them there at build time); a source
checkout (editable install, PYTHONPATH) reads them where they are, at the checkout's root."""

from __future__ import annotations

from pathlib import Path

from laionbuild.recipe.errors import RecipeError

TEMPLATE_FILES = ("conf", "dvc.yaml", ".dvcignore", ".gitignore", "demo")  # (setup.py reads this line too)
PACKAGED = Path(__file__).resolve().parents[1] / "_template"
CHECKOUT = Path(__file__).resolve().parents[2]
# `hydra.searchpath` entry of a dataset repo's conf/config.yaml: the shipped conf/, searched
# after the repo's own (hydra_plugins/laionbuild_conf serves the scheme, for DVC's Hydra too)
SHIPPED_CONF_SEARCHPATH = "laionbuild://conf"


def template_root() -> Path:
    """Where the template is: the wheel's package data, else the source checkout's root."""
    for root in (PACKAGED, CHECKOUT):
        if all((root / name).exists() for name in TEMPLATE_FILES):
            return root
    missing = [n for n in TEMPLATE_FILES if not (PACKAGED / n).exists()]
    raise RecipeError(f"laionbuild's project template is missing {missing} in {PACKAGED} (and {CHECKOUT} is not a "
                      "source checkout): reinstall laionbuild from its wheel or sdist")


def shipped_conf() -> Path:
    """The shipped `conf/`: every config group and recipe."""
    return template_root() / "conf"

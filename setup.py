"""The wheel carries the project template (conf/, dvc.yaml, .dvcignore, .gitignore, demo/) as
package data in laionbuild/_template/, copied there at build time: the source tree keeps them
at its root, where a checkout's DVC and Hydra read them (laionbuild.project.template). Every
other setting is in pyproject.toml."""

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _template_files() -> tuple:
    """TEMPLATE_FILES of laionbuild/project/template.py, the one list of them (read, not
    imported: the package's dependencies need not be installed to build it)."""
    source = Path(__file__).resolve().parent / "laionbuild" / "project" / "template.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["TEMPLATE_FILES"]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{source}: no TEMPLATE_FILES = (...) assignment")


TEMPLATE_FILES = _template_files()


class build_py_with_template(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout itself
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "laionbuild" / "_template"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in TEMPLATE_FILES:
            source = root / name
            if source.is_dir():
                shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": build_py_with_template})

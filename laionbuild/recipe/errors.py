"""The errors a user can fix: `laionbuild` prints them as one line and exits 2 (cli.main).

Anything else raised inside a stage is a bug and keeps its traceback."""

from __future__ import annotations


class LaionbuildError(Exception):
    """An expected error: a recipe, an input file or a command line at fault. The message names
    the key, file or column and what would fix it."""


class RecipeError(LaionbuildError, ValueError):
    """A recipe that cannot be built. The message names the key (and file) at fault."""


class InputError(LaionbuildError, ValueError):  # a ValueError too: callers that caught one still do
    """An input the recipe or the command points at (a source file, a build, a part) that cannot
    be used as asked."""


class MissingInputError(LaionbuildError, FileNotFoundError):
    """An input the recipe or the command points at that does not exist."""

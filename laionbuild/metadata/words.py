"""prepare.caption_word_list: keep captions that contain a word or phrase of a list (DataComp's
text-based baseline keeps captions naming an ImageNet-21k synset). Matching is whole-word and
case-insensitive: caption and list are case-folded (str.casefold) and split into words (runs of
Unicode letters, digits and `_`; everything else separates), and a phrase of k words matches k
consecutive words of the caption ("hot dog" matches "A hot-dog stand", not "hotdogs")."""

from __future__ import annotations

import re
from typing import Callable, Iterable

from laionbuild.recipe.errors import InputError

_WORD = re.compile(r"\w+")


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.casefold()))


def load_word_list(url: str) -> dict[int, set[tuple[str, ...]]]:
    """The list's phrases by their number of words: one word or phrase per line; blank lines
    and lines starting with `#` are skipped."""
    from laionbuild.project.inputs import local_copy

    try:  # a remote list: one local copy per recorded version, not one download per part
        with open(local_copy(url, "word_list.json", "prepare.caption_word_list"), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{url}: cannot read the word list (prepare.caption_word_list): {exc}") from None
    phrases: dict[int, set[tuple[str, ...]]] = {}
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#") and (phrase := words(line)):
            phrases.setdefault(len(phrase), set()).add(phrase)
    if not phrases:
        raise InputError(f"{url}: the word list (prepare.caption_word_list) has no word: write one word or phrase "
                         "per line")
    return phrases


def matcher(phrases: dict[int, set[tuple[str, ...]]]) -> Callable[[Iterable[str | None]], list[bool]]:
    """captions -> whether each contains one of the phrases (a missing caption contains none)."""
    lengths = sorted(phrases)

    def contains(caption: str | None) -> bool:
        if not caption:
            return False
        found = words(caption)
        return any(found[i:i + n] in phrases[n] for n in lengths for i in range(len(found) - n + 1))

    return lambda captions: [contains(c) for c in captions]

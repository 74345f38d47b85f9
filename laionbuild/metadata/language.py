"""Offline caption language identification with langid.py (its model ships inside the package).

`detect(captions, min_score)` returns ISO 639-1 codes, or None where the caption is empty or
the normalised probability of the best language is below `min_score`."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect(captions, min_score: float = 0.0) -> list:
    identify = _identifier().classify
    out = []
    for caption in captions:
        if caption is None or not str(caption).strip():
            out.append(None)
            continue
        language, score = identify(str(caption))
        out.append(language if score >= min_score else None)
    return out


@lru_cache(maxsize=1)
def known_languages() -> frozenset:
    """The ISO 639-1 codes langid can return (prepare.languages is checked against them)."""
    return frozenset(_identifier().nb_classes)

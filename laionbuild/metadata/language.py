"""Offline caption language identification: langid.py (its model ships inside the package; the
default) or fastText (`prepare.language_detector: fasttext` with `prepare.language_model`, a
model file such as fastText's lid.176.bin, the detector of DataComp's basic, text- and
image-based baselines).

`detect(captions, min_score, detector, model)` returns ISO 639-1 codes (fastText's labels
without `__label__`), or None where the caption is empty or the probability of the best
language is below `min_score` (langid's normalised probability; fastText's softmax). fastText
reads one line, so newlines are spaces first, as DataComp's get_fasttext_language does."""

from __future__ import annotations

from functools import lru_cache

LABEL = "__label__"


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


@lru_cache(maxsize=2)
def _fasttext(path: str):
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # its load_model warning on every load
    return fasttext.load_model(path)


def detect(captions, min_score: float = 0.0, detector: str = "langid", model: str | None = None) -> list:
    captions = [None if c is None or not str(c).strip() else str(c) for c in captions]
    if detector == "fasttext":
        texts = [c.replace("\n", " ").replace("\r", " ") for c in captions if c is not None]
        labels, scores = _fasttext(model).predict(texts, k=1) if texts else ([], [])
        found = iter((label[0][len(LABEL):], float(score[0])) for label, score in zip(labels, scores))
    else:
        identify = _identifier().classify
        found = (identify(c) for c in captions if c is not None)
    out = []
    for caption in captions:
        if caption is None:
            out.append(None)
            continue
        language, score = next(found)
        out.append(language if score >= min_score else None)
    return out


def known_languages(detector: str = "langid", model: str | None = None) -> frozenset:
    """The codes the detector can return (prepare.languages is checked against them)."""
    if detector == "fasttext":
        return frozenset(label[len(LABEL):] for label in _fasttext(model).get_labels())
    return frozenset(_identifier().nb_classes)

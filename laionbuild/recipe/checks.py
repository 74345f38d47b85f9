"""Checks across sections of a typed recipe, each a short generator of problems with the full
key path. Types and ranges live on the dataclasses in laionbuild/recipe/schema.py, checks inside one
section in its `problems()`; what needs two sections (or the installed libraries) is here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from laionbuild.recipe.schema import Config, Problem

# prepare filters and the source column each reads
PREPARE_NEEDS = {"min_similarity": "similarity", "min_width": "width", "min_height": "height",
                 "max_aspect_ratio": "width"}


def sections(c: Config) -> Iterator[Problem]:
    """Each section's own checks, keys prefixed with the section."""
    for name in type(c).__dataclass_fields__:
        section = getattr(c, name)
        for key, value, message in getattr(section, "problems", lambda: ())():
            yield (f"{name}.{key}" if key else name), value, message


def parts(c: Config) -> Iterator[Problem]:
    available = c.source.consolidate_parts or c.source.num_parts
    missing = [part for part in c.subset.parts if part >= available]
    if missing:
        yield ("subset.parts", list(c.subset.parts), f"parts {missing} do not exist in source `{c.source.name}` "
               f"(parts 0..{available - 1})")


def columns(c: Config) -> Iterator[Problem]:
    for key, column in PREPARE_NEEDS.items():
        if getattr(c.prepare, key) is not None and column not in c.source.columns:
            yield (f"prepare.{key}", getattr(c.prepare, key),
                   f"needs the source column `{column}` (source.columns.{column} is not mapped)")
    for key in c.dedup.keys:
        if key not in c.source.columns:
            yield "dedup.keys", list(c.dedup.keys), f"`{key}` is not mapped by source.columns"


def images(c: Config) -> Iterator[Problem]:
    """What needs downloaded images, or the source's precomputed embeddings instead."""
    if c.embed.from_source and not c.source.image_embeddings:
        yield "embed.from_source", True, "needs source.image_embeddings (the source's precomputed embedding files)"
    if not c.download.enabled and not c.embed.from_source:
        yield ("download.enabled", False, "without images there is nothing to embed: set embed.from_source=true "
               "(with source.image_embeddings)")
    if not c.download.enabled and c.tag.faces.detector != "none":
        yield "download.enabled", False, "face tags need images: set tag.faces.detector=none"
    for key in ("min_clip_similarity", "min_clip_similarity_by_language"):
        if c.embed.from_source and getattr(c.select, key):
            yield (f"select.{key}", getattr(c.select, key), "needs text embeddings, which embed.from_source does "
                   "not have (use prepare.min_similarity, the source's own similarity column)")
    if c.embed.from_source and c.embed.text_model is not None:
        yield "embed.text_model", c.embed.text_model, "embeds captions beside images, which embed.from_source builds lack"


def text_model(c: Config) -> Iterator[Problem]:
    """embed.text_model's kind against the engine: M-CLIP models run on the local engine only."""
    if not c.embed.text_model or c.embed.text_model == "???" or c.engine.name != "spark":
        return
    from laionbuild.models import text_encoders

    try:
        found = text_encoders.kind(c.embed.text_model)
    except text_encoders.TextModelError:
        return  # (embed.text_model's own check says what is wrong)
    if found == "mclip":
        yield ("embed.text_model", c.embed.text_model, "an M-CLIP model embeds on the local engine only (clip-retrieval's "
               "Spark path loads sentence-transformers models): use engine=local or a sentence-transformers model")


def model_names(c: Config) -> Iterator[Problem]:
    users = {"tag.clip_similarity_model": c.tag.clip_similarity_model, "tag.near_dup.model": c.tag.near_dup.model,
             "index.model": c.index.model, "export.model": c.export.model,
             **{f"tag.heads.{n}.model": h.model for n, h in c.tag.heads.items()}}
    for key, name in users.items():
        if name is not None and name not in c.embed.extra_models:
            yield key, name, f"not in embed.extra_models ({sorted(c.embed.extra_models)}); null means embed.model"


def tags(c: Config) -> Iterator[Problem]:
    """select rules need the tags they read."""
    for key in ("min_faces", "min_face_score"):
        if getattr(c.select, key) is not None and c.tag.faces.detector == "none":
            yield (f"select.{key}", getattr(c.select, key),
                   "needs face tags: set tag.faces.detector (auto, opencv_haar or retinaface)")
    if c.select.max_near_dup_similarity is not None and not c.tag.near_dup.enabled:
        yield "select.max_near_dup_similarity", c.select.max_near_dup_similarity, "needs tag.near_dup.enabled=true"
    for bound in ("min_scores", "max_scores"):
        for name in getattr(c.select, bound):
            if name not in c.tag.heads:
                yield (f"select.{bound}.{name}", getattr(c.select, bound)[name],
                       f"is not a score head of tag.heads ({sorted(c.tag.heads)})")


def languages(c: Config) -> Iterator[Problem]:
    mapped = "language" in c.source.columns
    if c.select.min_clip_similarity_by_language and not (mapped or c.prepare.languages):
        yield ("select.min_clip_similarity_by_language", dict(c.select.min_clip_similarity_by_language),
               "needs a `language` column: map the source's (source.columns.language, e.g. LANGUAGE) or detect it "
               "(prepare.languages)")
    if mapped and c.prepare.languages:
        yield ("prepare.languages", list(c.prepare.languages), f"detects a `language` column, and the source maps its "
               f"own (source.columns.language: {c.source.columns['language']}): drop one (e.g. ~source.columns.language)")
    if not c.prepare.languages:
        return
    from laionbuild.metadata.language import known_languages

    known = known_languages()
    for code in c.prepare.languages:
        if code not in known:
            yield ("prepare.languages", list(c.prepare.languages),
                   f"`{code}` is not a language code langid detects (ISO 639-1, e.g. en, de, fr; {len(known)} known)")


def storage(c: Config) -> Iterator[Problem]:
    url = c.download.shards_url
    if url is None:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0] if "://" in url else "file")
    except (ImportError, ValueError) as exc:
        yield "download.shards_url", url, str(exc)


def safety(c: Config) -> Iterator[Problem]:
    """prepare.blocklists and select.unsafe_keywords: what they read (docs/safety.md)."""
    from laionbuild.metadata.blocklists import problems

    yield from problems(c)


CHECKS = (sections, parts, columns, images, text_model, model_names, tags, languages, storage, safety)


def problems(c: Config) -> Iterator[Problem]:
    for check in CHECKS:
        yield from check(c)

"""Checks across sections of a typed recipe, each a short generator of problems with the full
key path. Types and ranges live on the dataclasses in laionbuild/recipe/schema.py, checks inside one
section in its `problems()`; what needs two sections (or the installed libraries) is here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from laionbuild.recipe.values import WATERMARK_COLUMN

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
    array, emb = c.embed.from_source_array, c.source.image_embeddings or ""
    if c.embed.from_source and emb.endswith(".npz") and array is None:
        yield ("embed.from_source_array", None, f"source.image_embeddings `{emb}` is an .npz of several arrays: "
               "name the one to take (DataComp: l14_img or b32_img)")
    if c.embed.from_source and emb.endswith(".npy") and array is not None:
        yield "embed.from_source_array", array, f"source.image_embeddings `{emb}` is one array (.npy): set it to null"
    if not c.download.enabled and c.tag.watermark.weights is not None:
        yield "download.enabled", False, "the watermark tag needs images: set tag.watermark.weights=null"
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
             "tag.clusters.model": c.tag.clusters.model,
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
    if c.select.in_target_clusters and not (c.tag.clusters.enabled and c.tag.clusters.targets):
        yield ("select.in_target_clusters", True, "needs tag.clusters.enabled=true and tag.clusters.targets (files of "
               "target embeddings, e.g. ImageNet-1k's image features)")
    clusters = c.tag.clusters
    for key, path in [("centroids", clusters.centroids), *((f"targets.{i}", t) for i, t in enumerate(clusters.targets))]:
        if not clusters.enabled or path is None or "://" in path:
            continue
        if path in ("", "???"):
            yield (f"tag.clusters.{key}", path, "must be given: a file of embeddings (.npy, .npz or .pt), e.g. "
                   "DataComp's ImageNet-1k ViT-L/14 image features for the image-based baseline (docs/recipes.md)")
        elif not Path(path).expanduser().is_file():
            yield f"tag.clusters.{key}", path, "is not a file (an array of embeddings: .npy, .npz or .pt)"
    for bound in ("min_scores", "max_scores"):
        for name in getattr(c.select, bound):
            if name == WATERMARK_COLUMN and name not in c.tag.heads:
                yield from _watermark_weights(f"select.{bound}.{name}", getattr(c.select, bound)[name], c)
            elif name not in c.tag.heads and name not in c.tag.source_columns:
                yield (f"select.{bound}.{name}", getattr(c.select, bound)[name],
                       f"is not a score head of tag.heads ({sorted(c.tag.heads)}), nor in tag.source_columns, nor the "
                       f"watermark tag ({WATERMARK_COLUMN}, tag.watermark)")


def tag_columns(c: Config) -> list[str]:
    """The columns of the tag table this recipe's tag stage writes (besides key and part)."""
    faces = ["face_count", "face_max_score"] if c.tag.faces.detector != "none" else []
    similarity = [] if c.embed.from_source else ["clip_similarity"]  # no text embeddings: always null
    watermark = [WATERMARK_COLUMN] if c.tag.watermark.weights is not None and WATERMARK_COLUMN not in c.tag.heads else []
    keyword = ["unsafe_keyword"] if c.tag.unsafe_keywords else []
    return [*similarity, "width", "height", *faces, *watermark, *keyword, *c.tag.heads, *c.tag.source_columns]


def top_fractions(c: Config) -> Iterator[Problem]:
    known = tag_columns(c)
    for name, fraction in c.select.top_fraction.items():
        if name not in known:
            yield (f"select.top_fraction.{name}", fraction, f"`{name}` is not a tag column of this recipe "
                   f"({', '.join(known)}); a score head (tag.heads) or tag.source_columns adds one")


def unsafe_keywords(c: Config) -> Iterator[Problem]:
    """select.unsafe_keywords rules on two tags: the keyword match and the score."""
    rule = c.select.unsafe_keywords
    if rule is None:
        return
    if not c.tag.unsafe_keywords:
        yield ("tag.unsafe_keywords", c.tag.unsafe_keywords, "the keyword list must be given for select.unsafe_keywords "
               f"({rule.score} > {rule.above} and a listed keyword): tag.unsafe_keywords=PATH, a local path or fsspec "
               "URL, one keyword a line (docs/safety.md)")
    known = tag_columns(c)
    if rule.score not in known:
        yield ("select.unsafe_keywords.score", rule.score, f"is not a tag column of this recipe ({', '.join(known)}): "
               f"a score head (tag.heads), or a metadata column listed in tag.source_columns (e.g. "
               f"tag.source_columns=[{rule.score}])")


def _watermark_weights(key: str, value, c: Config) -> Iterator[Problem]:
    """A rule on watermark_score needs the pixel model's checkpoint, given and there: without it the
    tag is skipped and the rule would have nothing to read (docs/watermark.md)."""
    from pathlib import Path

    weights = c.tag.watermark.weights
    if weights is None:
        yield (key, value, "needs the watermark tag: give LAION's checkpoint with tag.watermark.weights=PATH "
               "(watermark_model_v1.pt from LAION-AI/LAION-5B-WatermarkDetection; docs/watermark.md)")
    elif not Path(weights).expanduser().is_file():
        yield (key, value, f"needs the watermark tag, and its checkpoint tag.watermark.weights={weights} does not "
               "exist: put watermark_model_v1.pt there or give its path (docs/watermark.md)")


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

    detector, model = c.prepare.language_detector, c.prepare.language_model
    if detector == "fasttext" and not (model and Path(model).expanduser().is_file()):
        return  # prepare.language_model's own check says what is missing
    known = known_languages(detector, str(Path(model).expanduser()) if model else None)
    for code in c.prepare.languages:
        if code not in known:
            yield ("prepare.languages", list(c.prepare.languages),
                   f"`{code}` is not a language code {detector} detects (ISO 639-1, e.g. en, de, fr; {len(known)} known)")


def engines(c: Config) -> Iterator[Problem]:
    if c.engine.name == "spark" and c.prepare.caption_word_list is not None:
        yield ("prepare.caption_word_list", c.prepare.caption_word_list, "is not implemented on engine=spark: "
               "use engine=local (prepare is per part: DuckDB scales with the parts)")


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
    """prepare.blocklists and tag.unsafe_keywords: what they read (docs/safety.md)."""
    from laionbuild.metadata.blocklists import problems

    yield from problems(c)


CHECKS = (sections, parts, columns, images, text_model, model_names, tags, top_fractions, unsafe_keywords,
          languages, engines, storage, safety)


def problems(c: Config) -> Iterator[Problem]:
    for check in CHECKS:
        yield from check(c)

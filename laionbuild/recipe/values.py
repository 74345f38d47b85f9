"""Value types of the recipe schema that more than one module needs: the value sets the stages
dispatch on (faces.py, heads.py import them from here) and the memory strings of DuckDB,
autofaiss and Spark, each checked with the grammar of the library that reads it."""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import BeforeValidator

FaceDetectorName = Literal["none", "opencv_haar", "retinaface", "auto"]
HeadKind = Literal["linear", "mlp", "improved_aesthetic"]
ActivationName = Literal["relu", "none"]
# img2dataset computes the image hash with getattr(hashlib, name)
HashName = Literal["md5", "sha256", "sha512"]
# the tag column of the watermark stage (models/watermark.py), which select rules may name
WATERMARK_COLUMN = "watermark_score"
CanonicalColumn = Literal["url", "caption", "sample_id", "width", "height", "license", "nsfw", "similarity",
                          "language"]

FACE_DETECTORS = get_args(FaceDetectorName)
HEAD_KINDS = get_args(HeadKind)
ACTIVATIONS = get_args(ActivationName)
CANONICAL_COLUMNS = get_args(CanonicalColumn)


def _memory(pattern: str, example: str, reader: str):
    grammar = re.compile(pattern, re.IGNORECASE)

    def check(value: object) -> object:
        if not isinstance(value, str) or not grammar.fullmatch(value):
            raise ValueError(f"not a memory size {reader} reads; write a number and a unit, e.g. {example}")
        return value

    check.description = f"a memory size {reader} reads, e.g. `{example}`"  # for the key table
    return check


# DuckDB's SET memory_limit: KB, MB, GB, TB (1000^i) or KiB.. (1024^i), optional space
DuckdbMemory = Annotated[str, BeforeValidator(_memory(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]i?B?)\s*", "4GB", "DuckDB"))]
# autofaiss's cast_memory_to_bytes: 16G, 16GB, 512M
FaissMemory = Annotated[str, BeforeValidator(_memory(r"(\d+\.?\d*|\.\d+)([KMGTPEZ]B?|B)", "4G", "autofaiss"))]
# Spark's JVM sizes: 4g, 512m
SparkMemory = Annotated[str, BeforeValidator(_memory(r"\d+([kmgtp]b?)", "4g", "Spark"))]

"""Spark UDFs, in their own module: pandas_udf reads the type hints below, which need pandas at
module level, and the local engine should not pay for importing pandas."""

from __future__ import annotations

import pandas as pd

from laionbuild.metadata.language import detect


def language_udf(min_score: float, detector: str = "langid", model: str | None = None):
    from pyspark.sql.functions import pandas_udf

    def language(captions: pd.Series) -> pd.Series:
        return pd.Series(detect([None if pd.isna(c) else c for c in captions], min_score, detector, model),
                         dtype="object")

    return pandas_udf(language, "string")

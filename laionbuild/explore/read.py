"""`laionbuild.read`: a build's selected samples straight from its download shards, before (or
without) materialising them into `data/dataset`, e.g. to look at or train on a sweep point that
has only been selected (`laionbuild build --stage select`, or a DVC experiment's workspace).

    import laionbuild
    for sample in laionbuild.read("path/to/project"):      # webdataset samples, dataset order
        sample["__key__"], sample["jpg"], sample["txt"], sample["json"]

    import webdataset as wds                                # decoded, as a webdataset pipeline
    pipeline = wds.DataPipeline(lambda: laionbuild.read("."), wds.decode("pil"), wds.to_tuple("jpg", "txt"))

The samples are byte for byte what `assemble` writes into `data/dataset` for the same selection
(laionbuild/shards/samples.py), so training on a point before and after materialising it sees
the same data. It reads `data/selected` as it is: build up to `select` after changing a rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from laionbuild.project.layout import SELECTED
from laionbuild.recipe.errors import InputError
from laionbuild.recipe.schema import load_params
from laionbuild.shards.samples import selected_samples


def read(project: str | Path = ".") -> Iterator[dict]:
    """The selected samples of the build in `project` (its params.yaml and data/), in dataset
    order, as webdataset sample dicts."""
    root = Path(project)
    cfg = load_params(str(root / "params.yaml"))
    if not cfg.download.enabled:
        raise InputError(f"{root}: download.enabled is false, so the build has no images to read; its "
                         "selection is data/selected/selected.parquet and its embeddings data/embed")
    if not (root / SELECTED / "selected.parquet").exists():
        raise InputError(f"{root / SELECTED / 'selected.parquet'} does not exist: build up to the selection "
                         "first (`laionbuild build --stage select`)")
    return selected_samples(list(cfg.subset.parts), root)

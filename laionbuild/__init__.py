from laionbuild.web.without_torch import from_environment as _without_torch

_without_torch()  # a child spawned by a torch-free stage process (laionbuild.web.without_torch)


def read(project="."):
    """A build's selected samples straight from its download shards, as webdataset sample dicts
    in dataset order (laionbuild/explore/read.py): a sweep point readable before materialising."""
    from laionbuild.explore.read import read as _read

    return _read(project)

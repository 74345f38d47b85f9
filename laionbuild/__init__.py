from laionbuild.web.without_torch import from_environment as _without_torch

_without_torch()  # a child spawned by a torch-free stage process (laionbuild.web.without_torch)

"""img2dataset's Downloader with the policy opener (laionbuild/web/policy_opener.py). Its own module:
importing it imports img2dataset, which only the download's processes should pay for."""

from __future__ import annotations

from img2dataset.downloader import Downloader

from laionbuild.web.policy_opener import Policy, install


class PolicyDownloader(Downloader):
    """img2dataset's Downloader, installing the policy opener in the process that runs it (a
    spawned worker or a Spark executor unpickles it, importing this module)."""

    policy: Policy | None = None  # set by `downloading_with` in the stage's process

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.laionbuild_policy = type(self).policy
        if self.laionbuild_policy is None:
            raise RuntimeError("PolicyDownloader used outside laionbuild.web.policy_opener.downloading_with")

    def __call__(self, row):
        install(self.laionbuild_policy)
        return super().__call__(row)

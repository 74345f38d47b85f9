"""A Hydra config source for the `laionbuild://` scheme: `laionbuild://conf` is the `conf/`
laionbuild ships (every group and recipe; laionbuild.project.template). A dataset repo's
conf/config.yaml lists it in `hydra.searchpath`, so its own conf/ is searched first and the
shipped groups after it, by `laionbuild compose` and by DVC's Hydra composition (`dvc exp
run -S`) alike: both find this module through Hydra's plugin discovery (`hydra_plugins`). A
plain `file://` path would name one machine's site-packages; `pkg://` needs the files inside
an importable package, which a source checkout's conf/ is not."""

from hydra._internal.core_plugins import file_config_source


class LaionbuildConfigSource(file_config_source.FileConfigSource):
    def __init__(self, provider: str, path: str) -> None:
        from laionbuild.project.template import template_root

        super().__init__(provider=provider, path=path)
        self.path = str(template_root() / self.path)  # `conf` -> <template>/conf

    @staticmethod
    def scheme() -> str:
        return "laionbuild"

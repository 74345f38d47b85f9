"""The Python daemon of Spark executors (`spark.python.daemon.module`): arranges for laionbuild's
open_clip model configs (e.g. the tiny test architecture) to be registered when a worker forked
from it imports open_clip, so clip-retrieval's tasks on executors load the same architectures as
the driver, while workers of other tasks never import open_clip or torch; then runs PySpark's
own daemon."""

from __future__ import annotations

if __name__ == "__main__":
    try:
        from laionbuild.models.clip import register_model_configs_on_import

        register_model_configs_on_import()
    except Exception:  # noqa: BLE001 - a worker without open_clip still serves other tasks
        pass
    from pyspark.daemon import manager

    manager()

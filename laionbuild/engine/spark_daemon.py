"""The Python daemon of Spark executors (`spark.python.daemon.module`): registers laionbuild's
open_clip model configs (e.g. the tiny test architecture) before Spark forks workers from it, so
clip-retrieval's tasks on executors load the same architectures as the driver; then runs
PySpark's own daemon."""

from __future__ import annotations

if __name__ == "__main__":
    try:
        from laionbuild.models.clip import register_model_configs

        register_model_configs()
    except Exception:  # noqa: BLE001 - a worker without open_clip still serves other tasks
        pass
    from pyspark.daemon import manager

    manager()

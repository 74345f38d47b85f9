"""The Spark engine: a SparkSession per process (`engine.master`: local[N], spark://host:port,
yarn, or `active` to use the session already running in this process, e.g. under spark-submit).
Workers run this environment's Python (PYSPARK_PYTHON defaults to it).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from laionbuild.environment import patched

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")


def spark_session(engine_cfg):
    """The SparkSession for `engine_cfg` (created once per process; `active`: the one already
    running). Executors' Python workers register laionbuild's open_clip model configs first
    (laionbuild.engine.spark_daemon); `executor_environment` hands them variables per job."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    if engine_cfg.master == "active":
        session = SparkSession.getActiveSession()
        if session is None and os.environ.get("PYSPARK_GATEWAY_PORT"):
            # a driver program started by spark-submit (laionbuild.engine.spark_submit): its JVM is up
            # and configured; the session is created from that configuration
            session = (SparkSession.builder.config("spark.python.daemon.module", "laionbuild.engine.spark_daemon")
                       .getOrCreate())
            session.sparkContext.setLogLevel("ERROR")
        if session is None:
            raise RuntimeError("engine.master=active but no SparkSession is active in this process "
                               "(start the stage with spark-submit: laionbuild/engine/spark_submit.py)")
        return session
    builder = (SparkSession.builder.master(engine_cfg.master).appName("laionbuild")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.driver.memory", engine_cfg.driver_memory)
               .config("spark.sql.shuffle.partitions", str(engine_cfg.shuffle_partitions)))
    # Python workers fork from our daemon, which registers laionbuild's open_clip model configs first
    builder = builder.config("spark.python.daemon.module", "laionbuild.engine.spark_daemon")
    for key, value in engine_cfg.conf.items():
        builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


@contextmanager
def executor_environment(session, names=PROXY_VARIABLES):
    """While open, the Python workers of the jobs this process starts see this process's values
    of `names` (unset here: set to "" there): by default the proxy variables, so executors see
    the driver's (image fetches ignore them: laionbuild/web/policy_opener.py connects itself).
    It works on a session started earlier (`engine.master=active`, a shared session): pyspark
    sends `SparkContext.environment` with every job, and workers with a different environment
    come from a daemon of their own."""
    with patched({n: os.environ.get(n, "") for n in names}, into=session.sparkContext.environment):
        yield


def _plain_type(t):
    import pyarrow as pa

    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain_type(t.value_type))
    return t


def spark_to_arrow(frame):
    """A Spark DataFrame as an Arrow table typed like DuckDB's and pyarrow's output (plain
    strings and lists), so both engines write the same parquet schema."""
    import pyarrow as pa

    table = frame.toArrow()
    schema = pa.schema([pa.field(f.name, _plain_type(f.type)) for f in table.schema])
    return table.cast(schema)

"""One place that builds the SparkSession.

A local run (`kiln curate ...`) starts `local[*]` itself; under spark-submit the
master and resources come from spark-submit and are left alone.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


def launched_by_spark_submit() -> bool:
    # spark-submit starts the JVM first and hands its gateway to the Python driver.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def get_spark(app_name: str = "kiln", master: str | None = None) -> SparkSession:
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Python workers must run this interpreter (with kiln's dependencies), not `python3`.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if not launched_by_spark_submit():
        master = master or os.environ.get("KILN_SPARK_MASTER", "local[*]")
        builder = builder.master(master)
        builder = (
            builder.config("spark.driver.memory", os.environ.get("KILN_DRIVER_MEMORY", "4g"))
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", str(2 * _local_cores(master)))
        )
    # HTML rows are large; smaller Arrow batches keep a Python worker's memory flat.
    builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", "512")
    # Spark's default INT96 timestamps are deprecated; micros with UTC read back as
    # timezone-aware crawl dates in pyarrow, polars and pandas.
    builder = builder.config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("KILN_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _local_cores(master: str) -> int:
    """Cores of a local master: local[4] -> 4; local[*] or a cluster URL -> this machine's."""
    inside = master[master.find("[") + 1:master.find("]")] if master.startswith("local[") else ""
    return int(inside) if inside.isdigit() else (1 if master == "local" else os.cpu_count() or 2)


def ship_file(spark: SparkSession, path: str, key: str = "") -> str:
    """Add `path` to SparkFiles under a name unique to its contents; returns the name
    executors ask `SparkFiles.get` for. SparkFiles refuses a second file of the same
    name from another path (a test's tmp dirs, two runs' model.bin) and never refetches
    a same-path file whose contents changed. `key` is a content hash when the caller
    has one; otherwise path, size and modification time stand for the contents."""
    import hashlib
    import shutil
    import tempfile

    if not key:
        st = os.stat(path)
        key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    base, ext = os.path.splitext(os.path.basename(path))
    name = f"{base}-{key}{ext}"
    staged = os.path.join(tempfile.gettempdir(), "kiln-shipped", name)
    if not os.path.exists(staged):
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        tmp = f"{staged}.{os.getpid()}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, staged)
    spark.sparkContext.addFile(staged)
    return name

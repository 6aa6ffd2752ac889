"""One place that builds the SparkSession.

A local run (`kiln curate ...`) starts `local[*,4]` itself: every core, and a failed
task tried up to 4 times as on a cluster (spark.task.maxFailures), where plain
`local[*]` tries once and a lost Python worker fails the whole job. A master the
user gives (`--master`, KILN_SPARK_MASTER) is used as given. Under spark-submit the
master and resources come from spark-submit and are left alone.
"""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession


ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"

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
        master = local_master(master)
        builder = builder.master(master)
        builder = (
            builder.config("spark.driver.memory", os.environ.get("KILN_DRIVER_MEMORY", "4g"))
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", str(2 * _local_cores(master)))
        )
    # Spark's default INT96 timestamps are deprecated; micros with UTC read back as
    # timezone-aware crawl dates in pyarrow, polars and pandas.
    builder = builder.config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    spark = builder.getOrCreate()
    # HTML rows are large; smaller Arrow batches keep a Python worker's memory flat. A
    # value given to spark-submit (--conf or spark-defaults.conf) is the user's and stays.
    if not spark.sparkContext.getConf().contains(ARROW_BATCH):
        spark.conf.set(ARROW_BATCH, "512")
    spark.sparkContext.setLogLevel(os.environ.get("KILN_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def local_master(master: str | None = None) -> str:
    """The master of a run not under spark-submit: the one given, else KILN_SPARK_MASTER,
    else all cores with up to 4 tries per task."""
    return master or os.environ.get("KILN_SPARK_MASTER", "local[*,4]")


def _local_cores(master: str) -> int:
    """Cores of a local master: local[4] and local[4,2] -> 4; local[*], local[*,4] or a
    cluster URL -> this machine's."""
    inside = master[master.find("[") + 1:master.find("]")] if master.startswith("local[") else ""
    cores = inside.partition(",")[0]  # local[N,F]: N cores, F tries per task
    return int(cores) if cores.isdigit() else (1 if master == "local" else os.cpu_count() or 2)


_SHIPPED: dict[tuple, str] = {}  # (application, staged path, archive) -> the name executors ask for


def ship(spark: SparkSession, path: str, key: str = "", archive: bool | None = None) -> str:
    """Make a file or directory available to executors; returns the name to give
    `load_once` there. The name carries `key` (a content hash; by default one is
    computed) because SparkFiles refuses a second file of the same name from another
    path and never refetches a re-added one whose contents changed.

    A local master takes a directory itself (addFile, recursive); a cluster master
    cannot (Spark rejects local directories there), so it gets a zip (addArchive),
    which each executor unpacks once. `archive` forces either, for tests."""
    import shutil
    import tempfile

    from kiln.formats.hashing import content_sha256

    path = os.path.abspath(path)
    is_dir = os.path.isdir(path)
    key = key or content_sha256(path)[:12]
    base, ext = (os.path.basename(path), "") if is_dir else os.path.splitext(os.path.basename(path))
    staged = os.path.join(tempfile.gettempdir(), "kiln-shipped", f"{base}-{key}{ext}")
    sc = spark.sparkContext
    if archive is None:
        archive = is_dir and not sc.master.startswith("local")
    cache_key = (sc.applicationId, staged, archive)
    if cache_key in _SHIPPED:
        return _SHIPPED[cache_key]
    if not os.path.exists(staged):
        # Staged under its content key and renamed into place whole, so concurrent runs
        # and later runs share one copy; hard links spare copying a multi-GB checkpoint.
        os.makedirs(os.path.dirname(staged), exist_ok=True)
        tmp = f"{staged}.{os.getpid()}.tmp"
        if is_dir:
            shutil.copytree(path, tmp, copy_function=_link_or_copy)
        else:
            shutil.copyfile(path, tmp)
        try:
            os.replace(tmp, staged)
        except OSError:  # another process staged the same contents first
            shutil.rmtree(tmp, ignore_errors=True)
    if archive:
        zipped = staged + ".zip"
        if not os.path.exists(zipped):
            os.replace(shutil.make_archive(f"{staged}.{os.getpid()}", "zip", staged), zipped)
        sc.addArchive(zipped)
        name = os.path.basename(zipped)
    else:
        sc.addFile(staged, recursive=is_dir)
        name = os.path.basename(staged)
    _SHIPPED[cache_key] = name
    return name


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# One loaded object per Python worker and (loader, shipped name, arguments).
_LOADED: dict[tuple, object] = {}


def load_once(name: str, loader, *args):
    """`loader(local_path, *args)`, once per Python worker: heavy assets (a fastText
    model, a tokenizer, a transformer) load on first use in a task and are reused by
    every later task of the worker. `name` is what `ship` returned, or an absolute path
    (a stage used in this process, before or without `prepare`); a path carries no
    content key, so its modification time joins the cache key and a model rewritten in
    place is loaded again."""
    if os.path.isabs(name):
        local = name
        key = (loader, name, args, _mtime(name))
    else:
        from pyspark import SparkFiles

        local = SparkFiles.get(name)
        key = (loader, name, args)
    if key not in _LOADED:
        _LOADED[key] = loader(local, *args)
    return _LOADED[key]


def _mtime(path: str) -> int:
    """Newest modification time of a file, or of a directory and the files directly in it."""
    if not os.path.isdir(path):
        return os.stat(path).st_mtime_ns
    return max([os.stat(path).st_mtime_ns] + [e.stat().st_mtime_ns for e in os.scandir(path)])


def spark_type(arrow_schema):
    """The Spark StructType for an Arrow schema (what mapInArrow wants)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(arrow_schema)

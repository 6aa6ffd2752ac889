"""What a Spark job needs from a cluster before its first stage: executors that import kiln.

A local master runs its Python workers with the driver's own interpreter, so kiln is
there. On a cluster each executor starts the Python that `spark.pyspark.python` (or
PYSPARK_PYTHON) names, and kiln reaches it only if the submit shipped it (`--py-files`
with kiln as a zip, or a packed environment with `--archives`) or the executors' image
has it installed. Without it the first stage fails deep inside a task, with an
ImportError while unpickling the stage, after spark.task.maxFailures tries;
`check_executors` asks first, with one tiny job, and says how to ship it.
"""

from __future__ import annotations

import sys

from kiln.config import ConfigError

HOW_TO_SHIP = ("ship it with --py-files dist/kiln.zip (the wheel of `pip wheel --no-deps . -w dist/` under a "
               ".zip name) or a packed venv with --archives; see README 'A Spark cluster'")


def check_executors(spark, log=None) -> list[dict]:
    """Import kiln in a Python worker on the executors (one task per core the application
    has, so every executor is likely asked); raise ConfigError naming the executor's Python
    and the error when one cannot, else log where they found it. Returns what each task
    saw; [] for a local master."""
    sc = spark.sparkContext
    if sc.master == "local" or sc.master.startswith("local["):  # local-cluster[...] has executors of its own
        return []

    # Defined in here so that cloudpickle sends its code: a module-level function goes by
    # reference (kiln.curation.cluster._probe), which an executor without kiln cannot
    # resolve. It reports a failed import instead of raising, which Spark would retry.
    def probe(_):
        import os
        import socket
        import sys

        found = {"host": socket.gethostname(), "python": sys.executable, "kiln": "", "error": ""}
        try:
            import kiln

            found["kiln"] = f"{kiln.__version__} {os.path.dirname(kiln.__file__)}"
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer
            found["error"] = f"{type(e).__name__}: {e}"
        yield found

    tasks = max(1, min(sc.defaultParallelism, 64))
    seen = sc.parallelize(range(tasks), tasks).mapPartitions(probe).collect()
    failed = [s for s in seen if s["error"]]
    if failed:
        s = failed[0]
        raise ConfigError(f"executors cannot import kiln ({s['error']}; host {s['host']}, Python "
                          f"{s['python']}): {HOW_TO_SHIP}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    for found in sorted({(s["kiln"], s["python"]) for s in seen}):
        log(f"[cluster] executors import kiln {found[0]} (Python {found[1]})")
    return seen

"""kiln on a Spark cluster: executors without kiln get kiln's message, and the pipeline on a
standalone cluster (also with workers killed mid-stage) writes what a local run writes.

Slow (minutes) and it starts JVMs of its own, so it runs only with KILN_CLUSTER_TEST=1;
`make cluster-test` runs the same script on the whole demo recipe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln.curation.cluster import HOW_TO_SHIP

from .run_cluster import ROOT, clean_env, executor_env

pytestmark = [
    pytest.mark.skipif(os.environ.get("KILN_CLUSTER_TEST") != "1", reason="a Spark cluster test: KILN_CLUSTER_TEST=1"),
    pytest.mark.skipif(not shutil.which("java") and not os.environ.get("JAVA_HOME"), reason="no Java"),
]

# local-cluster[1,1,1024]: one worker with one core, whose executor is its own JVM and
# starts the Python that PYSPARK_PYTHON names, as on a real cluster.
CHECK = textwrap.dedent("""
    import json
    from pyspark.sql import SparkSession
    from kiln.config import ConfigError
    from kiln.curation.cluster import check_executors

    spark = SparkSession.builder.master("local-cluster[1,1,1024]").config("spark.ui.enabled", "false").getOrCreate()
    try:
        print("SEEN", json.dumps(check_executors(spark)))
    except ConfigError as e:
        print("ERROR", e)
""")


def _check(python: Path, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=clean_env(PYSPARK_PYTHON=str(python)))
    assert done.returncode == 0, done.stderr[-3000:]
    return next(line for line in done.stdout.splitlines() if line.startswith(("SEEN", "ERROR")))


def test_executors_without_kiln_get_how_to_ship_it(tmp_path):
    python = executor_env(tmp_path)
    assert _check(python, tmp_path) == (
        f"ERROR executors cannot import kiln (ModuleNotFoundError: No module named 'kiln'; host "
        f"{os.uname().nodename}, Python {python}): {HOW_TO_SHIP}")


def test_executors_with_kiln_pass_the_check(tmp_path):
    import json

    import kiln

    seen = json.loads(_check(Path(sys.executable), tmp_path).removeprefix("SEEN "))
    assert {s["kiln"] for s in seen} == {f"{kiln.__version__} {os.path.dirname(kiln.__file__)}"}
    assert {s["error"] for s in seen} == {""}


def test_standalone_cluster_matches_local_run(tmp_path):
    """The script's modes on the demo recipe up to exact dedup (the full recipe is
    `make cluster-test`): equal outputs with kiln shipped by --py-files and by --archives,
    equal outputs after two workers are killed, kiln's message for a submit without kiln."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("run_cluster.py")), "--until", "dedup_exact",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "cluster-test: passed (equal, archive, kill, noship)"

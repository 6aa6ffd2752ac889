"""The curation pipeline on a real Spark standalone cluster on this machine, checked
against a local run of the same recipe.

    .venv/bin/python tests/cluster/run_cluster.py                 # every mode (make cluster-test)
    .venv/bin/python tests/cluster/run_cluster.py --mode equal    # or archive, kill, noship; repeatable

It starts a master and two workers (each its own JVM, one core each), builds kiln's
wheel and ships it with --py-files, as README "A Spark cluster" tells cluster users,
to executors whose Python has kiln's dependencies and not kiln. Then:

  equal    spark-submit kiln/curation/jobs/pipeline.py; every stage's kept ids, dropped
           ids by reason and stats.json counts must equal the local run's.
  archive  kiln shipped the other way, in a packed venv (--archives ENV.tar.gz#env with
           spark.pyspark.python=./env/bin/python), through the first stages.
  kill     the equal submit, and a worker JVM killed with SIGKILL while its executor
           runs a stage's tasks, twice (a replacement worker joins after each); the
           output must still equal the local run's, and Spark's event log must show
           the lost executors and the work redone.
  noship   the submit without --py-files: it must stop at once with kiln's message
           saying how to ship kiln (exit 2), not with an ImportError inside a task.

The cluster's JVMs run in their own process groups and are stopped at the end, also on
failure, Ctrl-C or SIGTERM. Exit status: 0 when every mode passed, 1 otherwise; 0 with
a message when there is no Java.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = Path(sys.executable)
SPARK_HOME = Path(__import__("pyspark").__file__).parent
SITE_PACKAGES = Path(__import__("pyspark").__file__).parents[1]
MODES = ("equal", "archive", "kill", "noship")


def log(msg: str) -> None:
    print(f"[cluster-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens there (Spark's usual port, as the README shows),
    else any free port: another cluster on this machine must not be joined by mistake."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of everything the test starts: the workers pass theirs on to their
    executors and Python workers, so nothing may point at kiln's source or venv Python."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "SPARK_CONF_DIR")}
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("KILN_LID_MODEL", str(ROOT / ".venv/share/kiln/lid.176.ftz"))
    env.update(extra)
    return env


class Cluster:
    """A standalone master and its workers, each `spark-class` JVM in its own process
    group so that stopping one also stops the executors it launched."""

    def __init__(self, tmp: Path, workers: int, worker_memory: str):
        self.tmp = tmp
        self.port = free_port(7077)
        self.ui_port = free_port(8080)
        self.url = f"spark://127.0.0.1:{self.port}"
        self.worker_memory = worker_memory
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers: list[str] = []
        self.killed: set[str] = set()
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.ui_port))
        for _ in range(workers):
            self.add_worker()

    def _start(self, name: str, cls: str, *args: str) -> subprocess.Popen:
        with open(self.tmp / "logs" / f"{name}.log", "wb") as out:  # the JVM keeps its own descriptor
            proc = subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), cls, *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
        self.procs[name] = proc
        return proc

    def add_worker(self) -> str:
        name = f"worker{len(self.workers) + 1}"
        work = self.tmp / "work" / name
        work.mkdir(parents=True)
        self._start(name, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                    "--memory", self.worker_memory, "--work-dir", str(work), "--webui-port", "0", self.url)
        self.workers.append(name)
        return name

    def alive_workers(self) -> int:
        try:
            state = get_json(f"http://127.0.0.1:{self.ui_port}/json/")
        except (OSError, ValueError):  # not up yet, or a partial answer while it starts
            return -1
        return sum(w["state"] == "ALIVE" for w in state["workers"])

    def wait_for_workers(self, n: int, timeout: float = 120) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.killed:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.tmp}/logs/{name}.log")
            if self.alive_workers() >= n:
                return time.time() - t0
            time.sleep(0.5)
        raise RuntimeError(f"fewer than {n} workers registered with {self.url} in {timeout:.0f}s")

    def kill9(self, name: str) -> None:
        """SIGKILL the worker JVM alone (not its group): a machine's worker daemon dying;
        its executor notices (WorkerWatcher) and exits on its own."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()
        self.killed.add(name)

    def work_dir(self, name: str) -> Path:
        return self.tmp / "work" / name

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):  # workers first, the master last
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group (a worker then stops its executors), SIGKILL after `grace`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.time()
    while time.time() - t0 < grace:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.3)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.poll()


# --------------------------------------------------------------------------- what ships

def build_wheel(tree: Path, tmp: Path) -> tuple[Path, Path]:
    """kiln's wheel, as `pip wheel --no-deps . -w dist/` builds it, and the same file under
    a .zip name: PySpark puts only .zip/.egg/.jar files of --py-files on the executors'
    sys.path (pyspark/core/context.py PACKAGE_EXTENSIONS); a .whl reaches the driver only.
    Built from a copy of the tree, so no stale build/lib of the checkout gets in, and once:
    the local run and every submit run this same code, whatever changes in the tree meanwhile."""
    src = tmp / "src"
    shutil.copytree(tree / "kiln", src / "kiln", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(tree / name, src / name)
    dist = tmp / "dist"
    # --no-build-isolation: this machine has no index to fetch setuptools from; the venv has it.
    run([str(VENV_PY), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)])
    wheel = next(dist.glob("kiln-*.whl"))
    zipped = dist / "kiln.zip"
    shutil.copy(wheel, zipped)
    return wheel, zipped


def executor_env(tmp: Path, name: str = "exec-env") -> Path:
    """A Python for the executors with kiln's dependencies and not kiln: a venv whose .pth
    names the project venv's site-packages. A plain path line adds the directory without
    running the .pth files in it, so kiln's editable-install hook stays out."""
    env = tmp / name
    run([str(VENV_PY), "-m", "venv", "--without-pip", str(env)])
    (_site_packages(env) / "kiln-deps.pth").write_text(f"{SITE_PACKAGES}\n")
    python = env / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import datatrove, trafilatura, fasttext, pyarrow\n"
                            "try:\n import kiln\nexcept ImportError:\n print('no kiln')\n"
                            "else:\n print('kiln at', kiln.__file__)"],
                           capture_output=True, text=True, cwd=tmp, env=clean_env())
    if probe.stdout.strip() != "no kiln":
        raise RuntimeError(f"executor Python is not what the test needs: {probe.stdout}{probe.stderr}")
    return python


def _site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3.*")) / "site-packages"


def packed_env(tmp: Path, wheel: Path) -> Path:
    """The --archives way: a venv with kiln installed from its wheel, packed as a tar.gz
    (what venv-pack writes, less its rewriting of the bin/ scripts, which Spark does not
    run). Here the venv reaches kiln's dependencies through its .pth, so the archive stays
    small; a real one holds them (README 'A Spark cluster')."""
    env = executor_env(tmp, "packed-env").parents[1]
    run([str(VENV_PY), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
         str(_site_packages(env)), str(wheel)])
    archive = tmp / "dist" / "kiln-env.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(env, arcname=".")  # symlinks (bin/python) stay links, as in venv-pack's archives
    return archive


def run(cmd: list[str], **kw) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


# --------------------------------------------------------------------------- runs

def pipeline_args(args, output: Path, until: str = "") -> list[str]:
    until = until or args.until
    extra = ["--until", until] if until else []
    return [args.recipe, "--input", *args.input, "--output", str(output), *extra, *args.pipeline_arg]


def local_run(args, output: Path, zipped: Path) -> float:
    """`kiln curate pipeline` on local[2,4], importing kiln from the zip the cluster gets."""
    t0 = time.time()
    # -P: the checkout in the working directory must not shadow the zip
    cmd = [str(VENV_PY), "-P", "-m", "kiln.cli", "curate", "pipeline", *pipeline_args(args, output), "--master", "local[2,4]"]
    log(f"local run: PYTHONPATH={zipped} " + " ".join(cmd))
    with open(output.parent / "logs" / f"{output.name}.log", "wb") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=clean_env(PYTHONPATH=str(zipped)))
    if done.returncode:
        raise RuntimeError(f"local run failed ({done.returncode}); see {out.name}")
    return time.time() - t0


def submit_cmd(args, cluster: Cluster, exec_python: Path | str, output: Path, py_files: Path | None,
               ui_port: int = 0, event_dir: Path | None = None, archives: str = "", until: str = "") -> list[str]:
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", cluster.url,
           "--driver-memory", "2g", "--executor-memory", args.executor_memory,
           # the driver is this venv's Python; the executors get one without kiln
           "--conf", f"spark.pyspark.driver.python={VENV_PY}",
           "--conf", f"spark.pyspark.python={exec_python}",
           "--conf", "spark.executorEnv.HF_HUB_OFFLINE=1",
           "--conf", f"spark.sql.shuffle.partitions={args.shuffle_partitions}"]
    if py_files:
        cmd += ["--py-files", str(py_files)]
    if archives:
        cmd += ["--archives", archives]
    if ui_port:
        cmd += ["--conf", f"spark.ui.port={ui_port}"]
    if event_dir:
        event_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir=file://{event_dir}",
                "--conf", "spark.eventLog.compress=false"]
    return cmd + [str(args.tree / "kiln/curation/jobs/pipeline.py"), *pipeline_args(args, output, until)]


SUBMITTED: list[subprocess.Popen] = []  # stopped at the end if still running (Ctrl-C, a failure)


def submit(cmd: list[str], logfile: Path, **env: str) -> subprocess.Popen:
    log("spark-submit: " + " ".join(cmd))
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=clean_env(**env),
                                start_new_session=True)
    SUBMITTED.append(proc)
    return proc


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc, grace=5)
        raise RuntimeError(f"spark-submit did not finish in {timeout:.0f}s")


# --------------------------------------------------------------------------- comparison

def stage_dirs(out: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(out.iterdir()) if p.is_dir() and p.name[:2].isdigit()}


def parquet_ids(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
    return sorted(i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def dropped_ids(stage: Path) -> dict[str, list[str]]:
    dropped = stage / "dropped"
    if not dropped.exists():
        return {}
    return {d.name.split("=", 1)[1]: parquet_ids(d) for d in sorted(dropped.iterdir()) if d.is_dir()}


STATS_KEYS = ("docs_in", "kept", "dropped", "dropped_total", "bytes_in", "bytes_kept", "chars_kept")


def stats_of(stage: Path) -> dict:
    """The counts of a stage's stats.json and its settings, with the run's own output
    directory (the tokenizer's shards_dir lies inside it) written as OUT. Seconds differ by
    run, and so does the fingerprint, a hash over the settings."""
    stats = json.loads((stage / "stats.json").read_text())
    extra = stats.get("extra", {})
    settings = json.dumps(extra.get("settings"), sort_keys=True)
    for out in (str(stage.parent.resolve()), os.path.relpath(stage.parent, ROOT)):  # as given: either
        settings = re.sub(f'"{re.escape(out)}/(?=[0-9][0-9]_)', '"OUT/', settings)
    return {**{k: stats.get(k) for k in STATS_KEYS}, "metrics": extra.get("metrics"), "settings": settings}


def availability(stage: Path) -> dict | None:
    path = stage / "shards" / "availability.json"
    if not path.exists():
        return None
    domains = json.loads(path.read_text())["domains"]
    return {d: (v["tokens"], v["documents"]) for d, v in domains.items()}


def kept_ids(out: Path) -> dict[str, tuple[list[str] | None, bool]]:
    """Each stage's kept ids, and whether they were derived rather than read. Stages that
    share one Spark pass (kiln fuses consecutive per-document stages) write no docs/ of
    their own; their kept ids are the next stage's kept ids plus the ids it dropped
    (write_dropped), since each stage reads exactly what the one before kept."""
    found: dict[str, tuple[list[str] | None, bool]] = {}
    after: list[str] | None = None  # kept ids of the stage after this one, plus the ids that stage dropped
    for name, stage in reversed(stage_dirs(out).items()):
        if (stage / "docs").is_dir():
            found[name] = (parquet_ids(stage / "docs"), False)
        else:
            found[name] = (after, True)
        ids, dropped = found[name][0], dropped_ids(stage)
        complete = sum(map(len, dropped.values())) == stats_of(stage)["dropped_total"]
        after = sorted(ids + [i for d in dropped.values() for i in d]) if ids is not None and complete else None
    return found


def compare(local: Path, cluster: Path, title: str, prefix: bool = False) -> list[str]:
    """Print one row per stage; return the differences (empty when the outputs agree).
    `prefix`: the cluster ran the first stages of the local run's recipe only."""
    problems = []
    a, b = stage_dirs(local), stage_dirs(cluster)
    if prefix:
        a = dict(list(a.items())[:len(b)])
    if list(a) != list(b):
        problems.append(f"stages differ: local {list(a)} vs cluster {list(b)}")
    kept_a, kept_b = kept_ids(local), kept_ids(cluster)
    rows = [("stage", "local in/kept/dropped", "cluster in/kept/dropped", "kept ids", "dropped ids", "stats.json",
             "verdict")]
    for name in [n for n in a if n in b]:
        sa, sb = stats_of(a[name]), stats_of(b[name])
        (ka, derived_a), (kb, derived_b) = kept_a[name], kept_b[name]
        da, db = dropped_ids(a[name]), dropped_ids(b[name])
        bad = []
        if derived_a != derived_b:
            bad.append(f"docs/ {'not ' * derived_a}written locally, {'not ' * derived_b}on the cluster")
        if ka is None or kb is None:
            kept = "n/a"
            bad.append("kept ids neither written nor derivable (no docs/, and no complete dropped/ after)")
        elif ka == kb:
            kept = f"same ({len(ka)}{', derived' * derived_a})"
        else:
            extra, lost = set(kb) - set(ka), set(ka) - set(kb)
            dups = len(kb) - len(set(kb))
            kept = f"+{len(extra)} -{len(lost)} dup {dups}"
            bad.append(f"kept ids: {len(extra)} only on the cluster, {len(lost)} only local, "
                       f"{dups} duplicated on the cluster")
        if da == db:
            dropped = f"same ({sum(map(len, da.values()))})"
        else:
            dropped = "DIFFER"
            for reason in sorted(set(da) | set(db)):
                if da.get(reason) != db.get(reason):
                    bad.append(f"dropped {reason}: local {len(da.get(reason, []))} ids, "
                               f"cluster {len(db.get(reason, []))}")
        diff = [k for k in sa if sa[k] != sb[k]]
        for k in diff:
            bad.append(f"stats.json {k}: local {sa[k]} cluster {sb[k]}")
        if availability(a[name]) != availability(b[name]):
            diff.append("availability.json")
            bad.append(f"availability.json (tokens, documents): local {availability(a[name])} "
                       f"cluster {availability(b[name])}")
        rows.append((name, f"{sa['docs_in']}/{sa['kept']}/{sa['dropped_total']}",
                     f"{sb['docs_in']}/{sb['kept']}/{sb['dropped_total']}", kept, dropped,
                     "same" if not diff else "DIFFER: " + ",".join(diff), "ok" if not bad else "DIFFER"))
        problems += [f"{name}: {m}" for m in bad]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{title}")
    for i, r in enumerate(rows):
        print("  " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  " + "-+-".join("-" * w for w in widths))
    print()
    return problems


# --------------------------------------------------------------------------- modes

def mode_equal(args, tmp: Path, cluster: Cluster, exec_python: Path, zipped: Path, local: Path) -> list[str]:
    out = tmp / "cluster_out"
    t0 = time.time()
    proc = submit(submit_cmd(args, cluster, exec_python, out, zipped), tmp / "logs" / "equal.log")
    rc = wait(proc, args.timeout)
    log(f"equal: spark-submit exit {rc} in {time.time() - t0:.0f}s")
    if rc:
        return [f"equal: spark-submit failed ({rc}); see {tmp}/logs/equal.log:\n{_tail(tmp / 'logs' / 'equal.log')}"]
    return (_shipped_from(tmp / "logs" / "equal.log", f"{zipped.name}/kiln", "equal")
            + compare(local, out, "equal: local run vs standalone cluster (2 workers x 1 core)"))


def _shipped_from(logfile: Path, where: str, mode: str) -> list[str]:
    """kiln's own line saying where the executors imported it from must name `where`."""
    lines = [line for line in logfile.read_text(errors="replace").splitlines()
             if line.startswith("[cluster] executors import kiln")]
    for line in lines:
        log(f"{mode}: {line}")
    if not lines or any(where not in line for line in lines):
        return [f"{mode}: the executors did not import kiln from {where}: {lines}"]
    return []


def mode_archive(args, tmp: Path, cluster: Cluster, archive: Path, zipped: Path, local: Path) -> list[str]:
    """kiln inside a packed environment (--archives ENV.tar.gz#env, spark.pyspark.python=./env/bin/python)
    rather than --py-files, through the stages up to --archive-until."""
    out = tmp / "cluster_archive"
    t0 = time.time()
    cmd = submit_cmd(args, cluster, "./env/bin/python", out, None, archives=f"{archive}#env",
                     until=args.archive_until)
    # the driver imports kiln from the zip (PYTHONPATH does not reach the executors)
    rc = wait(submit(cmd, tmp / "logs" / "archive.log", PYTHONPATH=str(zipped)), args.timeout)
    log(f"archive: spark-submit exit {rc} in {time.time() - t0:.0f}s")
    if rc:
        return [f"archive: spark-submit failed ({rc}); see {tmp}/logs/archive.log:\n"
                f"{_tail(tmp / 'logs' / 'archive.log')}"]
    # Spark unpacks the archive into each executor's directory under the name after '#'
    return _shipped_from(tmp / "logs" / "archive.log", "/env/lib/", "archive") + compare(local, out, f"archive: local run vs cluster with kiln in a packed venv (--archives), up to "
                               f"{args.archive_until}", prefix=True)


def mode_kill(args, tmp: Path, cluster: Cluster, exec_python: Path, zipped: Path, local: Path) -> list[str]:
    out = tmp / "cluster_kill"
    ui_port = free_port(4040)
    events = tmp / "events"
    t0 = time.time()
    proc = submit(submit_cmd(args, cluster, exec_python, out, zipped, ui_port, events), tmp / "logs" / "kill.log")
    api = f"http://127.0.0.1:{ui_port}/api/v1/applications"
    killed = []
    try:
        for after in args.kill_after:
            victim, when = None, ""
            while victim is None:
                if proc.poll() is not None:
                    return [f"kill: the job ended ({proc.returncode}) before a worker could be killed after "
                            f"{after}; see {tmp}/logs/kill.log"]
                if (out / after / "stats.json").exists():
                    victim, when = _busy_worker(api, cluster)
                time.sleep(0.2)
            cluster.kill9(victim)
            killed.append(victim)
            log(f"kill: SIGKILL to {victim}'s JVM at {time.time() - t0:.0f}s, in the kiln stage after {after}: "
                f"{when}")
            if args.replace:
                # what a cluster manager does for a lost machine; the master gives the app an executor there
                log(f"kill: {cluster.add_worker()} started in its place")
        rc = wait(proc, args.timeout)
    finally:
        if proc.poll() is None:
            _stop_group(proc, grace=5)
    log(f"kill: spark-submit exit {rc} in {time.time() - t0:.0f}s")
    for name in killed:  # its executor should have noticed the lost worker and exited (WorkerWatcher)
        left = _group_alive(cluster.procs[name].pid)
        log(f"kill: {name}'s executor {'is still running' if left else 'exited by itself'}")
    if rc:
        return [f"kill: spark-submit failed ({rc}) after a worker was killed; see {tmp}/logs/kill.log:\n"
                f"{_tail(tmp / 'logs' / 'kill.log')}"]
    problems = compare(local, out, f"kill: local run vs cluster with {' and '.join(killed)} killed mid-stage")
    seen = _event_summary(events)
    for key, value in seen.items():
        for item in value if isinstance(value, list) and value else [value]:
            log(f"kill: event log: {key}: {item}")
    if len(seen["executors_removed"]) != len(killed):
        problems.append(f"kill: {len(killed)} workers killed, the event log shows executors removed: "
                        f"{seen['executors_removed']}")
    if not seen["failed_attempts"] and not seen["stage_reattempts"]:
        problems.append("kill: the event log shows no failed task attempt and no stage reattempt: the kills "
                        "landed where no work was lost, which proves nothing")
    return problems


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _busy_worker(api: str, cluster: Cluster) -> tuple[str | None, str]:
    """The live worker whose executor is running tasks now, and the Spark stage they belong
    to; (None, "") while none is (between stages, or the UI is not up)."""
    try:
        app = get_json(api)[0]["id"]
        executors = get_json(f"{api}/{app}/executors")
        stages = get_json(f"{api}/{app}/stages?status=active")
    except (OSError, IndexError, ValueError):
        return None, ""
    for ex in executors:
        if ex["id"] == "driver" or not ex.get("isActive") or ex.get("activeTasks", 0) < 1:
            continue
        for name in cluster.workers:
            if name not in cluster.killed and (cluster.work_dir(name) / app / ex["id"]).is_dir():
                what = "; ".join(f"Spark stage {s['stageId']} ({s['name'][:60]}) "
                                 f"{s['numActiveTasks']} running, {s['numCompleteTasks']}/{s['numTasks']} done"
                                 for s in stages)
                return name, f"executor {ex['id']} ran {ex['activeTasks']} task(s): {what}"
    return None, ""


def _event_summary(events: Path) -> dict:
    """From the application's event log (Spark 4 writes a directory of rolling files): the
    task attempts that did not succeed, with how each task ended in the end, the executors
    removed, the stages Spark submitted again, and spark.task.maxFailures."""
    summary = {"failed_attempts": [], "executors_removed": [], "stage_reattempts": [],
               "spark.task.maxFailures": "4 (default)"}
    ends: dict[tuple[int, int], list[str]] = {}  # (stage, partition) -> each attempt's end
    for path in sorted(p for p in events.rglob("events_*") if p.is_file()):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            kind = e.get("Event")
            if kind == "SparkListenerTaskEnd":
                info, end = e["Task Info"], e["Task End Reason"]
                # Resubmitted: a finished map task whose output died with its executor
                cause = (f", caused by the app: {end['Exit Caused By App']}" if "Exit Caused By App" in end else "")
                ends.setdefault((e["Stage ID"], info["Index"]), []).append(
                    f"attempt {info['Attempt']} on executor {info['Executor ID']}: {end['Reason']}{cause}")
            elif kind == "SparkListenerExecutorRemoved":
                summary["executors_removed"].append(f"{e['Executor ID']} ({e.get('Removed Reason', '')[:60]})")
            elif kind == "SparkListenerStageSubmitted" and e["Stage Info"].get("Stage Attempt ID", 0) > 0:
                summary["stage_reattempts"].append(e["Stage Info"]["Stage ID"])
            elif kind == "SparkListenerEnvironmentUpdate":
                summary["spark.task.maxFailures"] = dict(e.get("Spark Properties", [])).get(
                    "spark.task.maxFailures", summary["spark.task.maxFailures"])
    for (stage, index), attempts in sorted(ends.items()):
        if any(not a.endswith(": Success") for a in attempts):
            summary["failed_attempts"].append(f"Spark stage {stage} task {index}: " + "; ".join(attempts))
    return summary


def mode_noship(args, tmp: Path, cluster: Cluster, exec_python: Path, zipped: Path) -> list[str]:
    out = tmp / "noship_out"
    t0 = time.time()
    logfile = tmp / "logs" / "noship.log"
    # The driver has kiln (from the zip, on PYTHONPATH, which the executors do not inherit),
    # as a user's driver has it installed; only the executors lack it.
    proc = submit(submit_cmd(args, cluster, exec_python, out, None), logfile, PYTHONPATH=str(zipped))
    rc = wait(proc, args.timeout)
    text = logfile.read_text(errors="replace")
    message = next((line for line in text.splitlines() if line.startswith("kiln: error:")), "")
    log(f"noship: spark-submit exit {rc} in {time.time() - t0:.0f}s; {message or 'no kiln error line'}")
    problems = []
    if rc != 2:
        problems.append(f"noship: exit {rc}, expected 2 (kiln's ConfigError)")
    if "executors cannot import kiln" not in message or "--py-files" not in message:
        problems.append(f"noship: no message saying how to ship kiln; log tail:\n{_tail(logfile)}")
    if "Traceback" in text:
        problems.append("noship: a traceback reached the user")
    if out.exists() and stage_dirs(out):
        problems.append(f"noship: stage outputs were written before the check: {list(stage_dirs(out))}")
    return problems


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--mode", action="append", choices=MODES, help="run only these modes (default: all)")
    p.add_argument("--recipe", default="recipes/demo.toml")
    p.add_argument("--input", nargs="+", default=["data/sample.warc.gz"])
    p.add_argument("--until", default="", help="stop after this stage in every run (default: the whole recipe)")
    p.add_argument("--local", type=Path, help="a finished local run of the same recipe to compare with "
                                              "(default: run one first)")
    p.add_argument("--kill-after", nargs="+", default=["02_langid", "04_dedup_url"],
                   help="kill mode: once each of these stages has its stats.json, the first worker whose "
                        "executor is running tasks dies (default: in the filter stage, then in exact dedup)")
    p.add_argument("--no-replace", dest="replace", action="store_false",
                   help="kill mode: do not start a replacement worker after the kill")
    p.add_argument("--archive-until", default="langid",
                   help="archive mode: run the recipe up to this stage (the shipping is what it tests)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-memory", default="2g")
    p.add_argument("--executor-memory", default="1g")
    p.add_argument("--shuffle-partitions", type=int, default=8,
                   help="spark.sql.shuffle.partitions of the cluster runs (the local run uses 2 x cores = 4)")
    p.add_argument("--timeout", type=float, default=900, help="seconds each spark-submit may take")
    p.add_argument("--pipeline-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to `kiln curate pipeline` in every run, e.g. --pipeline-arg=--keep-intermediate")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory, removed)")
    p.add_argument("--tree", type=Path, default=ROOT,
                   help="the kiln checkout to build and submit (default: this one), e.g. a `git worktree` of a commit")
    args = p.parse_args(argv)
    modes = args.mode or list(MODES)

    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        print("cluster-test: skipped: no Java (java on PATH or JAVA_HOME); a Spark cluster needs Java 17 or 21")
        return 0
    os.chdir(ROOT)

    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="kiln-cluster-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "logs").mkdir(exist_ok=True)
    cluster = None

    def stop(signum, _frame):
        raise SystemExit(f"cluster-test: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    timings, problems = {}, []
    try:
        t0 = time.time()
        args.tree = args.tree.resolve()
        wheel, zipped = build_wheel(args.tree, tmp)
        exec_python = executor_env(tmp)
        timings["wheel + executor env"] = time.time() - t0
        log(f"built {wheel.name} (shipped as {zipped}); executors run {exec_python} (no kiln)")
        local = args.local
        if local is None and modes != ["noship"]:
            local = tmp / "local_out"
            timings["local run"] = local_run(args, local, zipped)
        t0 = time.time()
        cluster = Cluster(tmp, args.workers, args.worker_memory)
        cluster.wait_for_workers(args.workers)
        timings["cluster start"] = time.time() - t0
        log(f"master {cluster.url} (UI :{cluster.ui_port}), {args.workers} workers registered "
            f"in {timings['cluster start']:.0f}s")
        for mode in modes:
            t0 = time.time()
            if mode == "equal":
                found = mode_equal(args, tmp, cluster, exec_python, zipped, local)
            elif mode == "archive":
                found = mode_archive(args, tmp, cluster, packed_env(tmp, wheel), zipped, local)
            elif mode == "kill":
                found = mode_kill(args, tmp, cluster, exec_python, zipped, local)
                if len(modes) > modes.index("kill") + 1:  # later modes get two live workers again
                    cluster.wait_for_workers(args.workers)
            else:
                found = mode_noship(args, tmp, cluster, exec_python, zipped)
            timings[mode] = time.time() - t0
            log(f"{mode}: {'PASS' if not found else 'FAIL'} ({timings[mode]:.0f}s)")
            problems += found
    except Exception as e:  # noqa: BLE001 - reported, and the cluster still stops
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        for proc in SUBMITTED:
            if proc.poll() is None:
                _stop_group(proc, grace=5)
        if cluster is not None:
            cluster.stop()
            log("cluster stopped")
        if args.workdir is None and not problems:
            shutil.rmtree(tmp, ignore_errors=True)
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if problems:
        print(f"cluster-test: FAILED (logs and outputs kept in {tmp}):")
        for m in problems:
            print(f"  - {m}")
        return 1
    print(f"cluster-test: passed ({', '.join(modes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

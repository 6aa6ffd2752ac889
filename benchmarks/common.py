"""What every benchmark script shares: the machine and versions it records, logging,
the Spark warm-up job, and where its tables are written."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _proc_field(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    mem = _proc_field("/proc/meminfo", "MemTotal")
    return {"hostname": socket.gethostname(), "nproc": os.cpu_count(),
            "cpu": _proc_field("/proc/cpuinfo", "model name") or "unknown",
            "ram_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
            "python": platform.python_version(), "os": platform.platform()}


def versions(*packages: str) -> dict:
    out = {}
    for pkg in ("kiln", "pyspark", "pyarrow", *packages):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def result_label(cores: int) -> str:
    """The host name, or 'Ncore' where the host name says nothing (a VM or container id)."""
    host = socket.gethostname().split(".")[0]
    generic = host in ("", "localhost", "vm") or (len(host) >= 12 and all(c in "0123456789abcdef" for c in host))
    return f"{cores}core" if generic else host


def write_results(out_dir: str | Path, name: str, report: dict, markdown: str, cores: int) -> Path:
    """`<out_dir>/<name>_<date>_<label>.md` and `.json`; returns the common stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{report['date']}_{result_label(cores)}"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {stem}.md and {stem}.json")
    return stem


def processes() -> dict[int, tuple[int, str, float, int]]:
    """pid -> (ppid, comm, CPU seconds, RSS bytes) for every process we can read."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        f = raw.rsplit(")", 1)[1].split()
        procs[int(name)] = (int(f[1]), comm, (int(f[11]) + int(f[12])) / tick, int(f[21]) * page)
    return procs


def is_ours(pid: int, procs: dict) -> bool:
    """True when `pid` descends from this process (Spark's JVM and Python workers, the
    extraction sandboxes, datatrove's pool): everything else is a neighbour."""
    me = os.getpid()
    for _ in range(64):
        if pid == me:
            return True
        if pid not in procs or pid <= 1:
            return False
        pid = procs[pid][0]
    return False


def warm_up(spark, cores: int) -> None:
    """A tiny job that starts Spark's Python workers before anything is timed.

    Session and worker start-up is a fixed cost paid once per application, not per
    document; on a 20-30 s measurement it would blur the per-document rate compared.
    (It does not warm the JVM's compiled code paths: scripts run kiln's jobs twice.)
    """
    from pyspark.sql.types import LongType, StructField, StructType

    def identity(batches):
        yield from batches

    (spark.range(0, 4 * cores, numPartitions=cores)
     .mapInArrow(identity, StructType([StructField("id", LongType())])).collect())

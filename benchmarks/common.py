"""What every benchmark script shares: the machine and versions it records, logging,
the Spark warm-up job, and where its tables are written."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Above this share of the machine used by other processes, a measurement is flagged.
NEIGHBOUR_WARNING = 0.05


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


def rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in bytes (`field` "VmHWM": its peak); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Monitor:
    """Times a block, counts the CPU other processes used meanwhile, and samples RSS.

    On a 2-core machine a neighbour (a test run, another benchmark) silently halves a
    rate, so every measurement reports how busy the rest of the machine was. RSS of
    the pids in `watch` (the driver Python process, the driver JVM) is sampled every
    50 ms: the peak minus the value just before the block is what the job added.
    """

    INTERVAL = 0.05
    CPU_EVERY = 5  # the CPU walk over /proc is costlier: every 5th sample (0.25 s)

    def __init__(self, watch: dict[str, int | None] | None = None):
        self.watch = {k: v for k, v in (watch or {}).items() if v}

    def __enter__(self):
        self.other_cpu_s = 0.0
        self.baseline = {k: rss(pid) for k, pid in self.watch.items()}
        self.peak = dict(self.baseline)
        self._seen = processes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._sample_cpu()

    def _run(self):
        n = 0
        while not self._stop.wait(self.INTERVAL):
            for k, pid in self.watch.items():
                self.peak[k] = max(self.peak[k], rss(pid))
            n += 1
            if n % self.CPU_EVERY == 0:
                self._sample_cpu()

    def _sample_cpu(self):
        now = processes()
        for pid, p in now.items():
            if not is_ours(pid, now):
                self.other_cpu_s += max(0.0, p[2] - self._seen.get(pid, (0, "", 0.0, 0))[2])
        self._seen = now

    @property
    def other_load(self) -> float:
        return self.other_cpu_s / (self.seconds * (os.cpu_count() or 1))

    def growth_mib(self) -> dict[str, float]:
        return {k: round((self.peak[k] - self.baseline[k]) / 2**20, 1) for k in self.watch}


def wait_until_quiet(max_wait: float, quiet: float = NEIGHBOUR_WARNING) -> float:
    """Before a measurement, wait up to `max_wait` s for 3 s in which other processes stay idle.

    It cannot stop a neighbour starting mid-measurement (that shows in the table); it
    only avoids starting in the middle of someone else's run. Returns the last share seen.
    """
    deadline = time.monotonic() + max_wait
    while True:
        with Monitor() as probe:
            time.sleep(3)
        if probe.other_load <= quiet:
            return probe.other_load
        if time.monotonic() >= deadline:
            log(f"other processes still use {probe.other_load:.0%} of the machine; measuring anyway")
            return probe.other_load
        log(f"other processes use {probe.other_load:.0%} of the machine; waiting (up to {max_wait:.0f} s)")
        time.sleep(2)


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


class Rates:
    """Rates of a measurement with `docs`, `seconds`, `cores` and `other_cpu_s` fields."""

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds

    @property
    def docs_per_s_per_core(self) -> float:
        return self.docs_per_s / self.cores

    @property
    def other_load(self) -> float:
        """Share of the machine's CPU that other processes took while this ran."""
        return self.other_cpu_s / (self.seconds * (os.cpu_count() or 1))


# --------------------------------------------------------------------------- memory benchmarks (kernels, post)


def maxrss_bytes() -> int:
    """This process's resident-memory high-water mark."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_loss(loss_of, h, w, spec: dict) -> dict:
    """Peak memory and time of `loss_of()` (a scalar loss of leaves h and w) forward and
    backward: the memory added by the first run over what the inputs already hold (CUDA
    allocator peak, or the process's RSS high-water mark on CPU), then the median of
    spec["reps"] timed runs; with the loss and the gradient norms, so the methods'
    results can be compared."""
    import statistics

    import torch

    cuda = h.device.type == "cuda"

    def step() -> float:
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_of()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        step.loss = loss.item()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, rss_before = maxrss_bytes(), rss_bytes()
    first = step()
    peak_added = (torch.cuda.max_memory_allocated() if cuda else maxrss_bytes()) - base
    times = [step() for _ in range(spec["reps"])]
    out = {**spec, "peak_added_mib": round(peak_added / 2**20, 1), "first_s": round(first, 3),
           "times_s": [round(x, 3) for x in times], "median_s": round(statistics.median(times), 3),
           "loss": step.loss, "grad_weight_norm": w.grad.float().norm().item(),
           "grad_hidden_norm": h.grad.float().norm().item(),
           "inputs_mib": round((h.numel() + w.numel()) * h.element_size() / 2**20, 1)}
    if not cuda:
        out["maxrss_before_mib"] = round(base / 2**20, 1)
        out["rss_before_mib"] = round(rss_before / 2**20, 1)
    return out


def run_worker(script: str, spec: dict) -> dict:
    """One case of a memory benchmark in a fresh interpreter (`script --worker SPEC`:
    ru_maxrss cannot be reset), with the CPU use of other processes recorded."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with Monitor() as mon:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec['method']} V={spec['vocab']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_load"] = round(mon.other_load, 3)
    result["process_s"] = round(mon.seconds, 1)
    return result


def compare_to_naive(rows: list[dict], methods: tuple[str, ...], memory_target: float, time_target: float,
                     grads: tuple[str, ...] = ("grad_weight_norm",)) -> list[dict]:
    """Each method's peak memory and median time over the naive method's, per vocabulary,
    with the loss and gradient-norm differences that say both computed the same thing."""
    out = []
    by = {(r["vocab"], r["method"]): r for r in rows}
    for vocab in sorted({r["vocab"] for r in rows}):
        naive = by[(vocab, "naive")]
        for method in methods:
            if (vocab, method) not in by:
                continue
            r = by[(vocab, method)]
            mem = r["peak_added_mib"] / naive["peak_added_mib"]
            tim = r["median_s"] / naive["median_s"]
            out.append({"vocab": vocab, "method": method, "memory_ratio": round(mem, 3), "time_ratio": round(tim, 3),
                        "loss_abs_diff": abs(r["loss"] - naive["loss"]),
                        **{f"{g}_rel_diff": abs(r[g] / naive[g] - 1) for g in grads},
                        "memory_result": "PASS" if mem <= memory_target else "MISS",
                        "time_result": "PASS" if tim <= time_target else "MISS"})
    return out

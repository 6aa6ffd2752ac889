"""Training metrics in one place: losses, bits per byte, throughput, MFU, memory.

Keys are namespaced (`train/loss`, `val/general/bpb`, `perf/mfu`); rank 0 prints a
progress line with an ETA and appends every record to a JSONL log (and to
TensorBoard when asked and installed).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

# Dense bf16 peak of the GPUs kiln expects (no sparsity), FLOP/s. MFU on CPU is not
# reported: there is no meaningful peak to divide by.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(n_params_nonembedding: int, num_layers: int, attention_width: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights' forward and backward, plus
    12 * layers * attention width (heads x head_dim) * seq_len for attention scores and
    values (PaLM appendix B; the count torchtitan's MFU uses, causal mask not halved;
    kiln plan's estimate of work done halves it: kiln.training.plan)."""
    return 6 * n_params_nonembedding + 12 * num_layers * attention_width * seq_len


def bits_per_byte(loss_nats_per_token: float, tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: total nats over the text's UTF-8 bytes, in bits."""
    return loss_nats_per_token * tokens / (n_bytes * math.log(2)) if n_bytes else float("nan")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep the records of steps up to `last_step` in the JSONL log at `path`: a stage
    resumed from its checkpoint at `last_step` logs the later steps again, and each step
    must appear once. The kept records go to a temporary file renamed over the log, so a
    kill here leaves the old log or the new one, never half of either. A line that is not
    JSON can only be the last one, torn by a kill mid-write: it goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, path: str | None, main: bool, tensorboard_dir: str = "", stream=None):
        self.main = main
        self.stream = stream
        self.file = None
        self.tb = None
        if main and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
        if main and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except ImportError:
                print("tensorboard is not installed: TensorBoard logging is off", file=stream or sys.stderr)

    def log(self, step: int, record: dict) -> None:
        if not self.main:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and "/" in k:
                    self.tb.add_scalar(k, v, step)

    def print(self, msg: str) -> None:
        if self.main:
            print(msg, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


class Throughput:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, flops_per_token: float, peak: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        tps = self.tokens / elapsed
        out = {"perf/tokens_per_s": tps, "perf/tokens_per_s_per_device": tps / self.world_size}
        if self.peak:
            out["perf/mfu"] = tps * self.flops_per_token / (self.peak * self.world_size)
        self.t0, self.tokens = now, 0
        return out


def eta(seconds_so_far: float, done: int, total: int) -> str:
    if not done:
        return "?"
    left = seconds_so_far / done * max(total - done, 0)
    return time.strftime("%H:%M:%S", time.gmtime(left))

"""Peak memory and time of kiln's chunked linear cross-entropy vs the naive one.

One forward + backward of the language-model loss, `hidden (N, H) @ weight (V, H).T`
against N targets, at vocabularies of 32k and 128k (Llama 2 / Llama 3), measured for

(a) naive: transformers' causal-LM loss on full logits, i.e. what `LlamaForCausalLM`
    computes with `labels=`: `F.linear` (the lm_head) for the (N, V) logits, then
    `transformers.loss.loss_utils.ForCausalLMLoss` (fp32 upcast, `F.cross_entropy`),
    backward through autograd. Imported, not re-typed.
(b) kiln: `kiln.kernels.linear_cross_entropy` with the backend "reference", the
    chunked reference that never holds the (N, V) logits.

Targets on CPU: kiln's peak memory <= 0.3 x naive, with time <= 1.2 x naive.

Memory. CPU PyTorch has no allocator statistics like CUDA's `max_memory_allocated`;
torch's profiler can record allocations but slows every op, which would spoil the
timing. So each case runs in a fresh subprocess and reads the kernel's high-water mark
of its resident memory, `getrusage(RUSAGE_SELF).ru_maxrss`, right after allocating the
inputs and again after the first forward + backward: the difference is what the loss
added at its peak (logits, softmax, gradients, allocator slack), i.e. what decides an
out-of-memory. It cannot be reset, hence one process per case. Both methods end holding
grad_hidden (N, H) and grad_weight (V, H); those count in both peaks. The process's RSS
just before the run is reported too, to show the baseline high-water mark was the inputs
themselves and not an earlier transient.

Time. torch uses `--threads` threads; the first forward + backward (the memory run) is
the warm-up, then the median of `--reps` more, gradients cleared between runs.

With CUDA available (`--device cuda`, or `auto` on a GPU machine) the same cases run on
the GPU in `--gpu-dtype` (bf16 by default), adding Liger-Kernel's fused linear
cross-entropy as a third method; memory there is `torch.cuda.max_memory_allocated`
minus the allocation after creating the inputs.

    python benchmarks/kernels_memory.py                       # CPU: N=4096, H=2048
    python benchmarks/kernels_memory.py --device cuda --tokens 8192 --hidden 4096

Results are printed and written to `benchmarks/results/kernels_memory_<date>_<label>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (compare_to_naive, log, machine, measure_loss, run_worker, versions,  # noqa: E402
                    wait_until_quiet, write_results)

ROOT = Path(__file__).resolve().parent.parent
MEMORY_TARGET = 0.3  # kiln peak memory <= 0.3 x naive
TIME_TARGET = 1.2  # kiln time <= 1.2 x naive
METHODS = {"cpu": ("naive", "kiln"), "cuda": ("naive", "kiln", "liger")}
LABELS = {"naive": "naive: F.linear + transformers ForCausalLMLoss (full fp32 logits)",
          "kiln": "kiln linear_cross_entropy, PyTorch reference (chunked)",
          "liger": "kiln linear_cross_entropy, Liger-Kernel (fused, chunked)"}


# --------------------------------------------------------------------------- worker (one case, one process)


def _loss_fn(method: str, vocab: int):
    import functools

    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    from kiln.kernels import linear_cross_entropy

    if method == "naive":
        # The targets are already next-token labels, hence shift_labels (no shift inside).
        return lambda h, w, t: ForCausalLMLoss(F.linear(h, w), None, vocab, shift_labels=t)
    return functools.partial(linear_cross_entropy, backend="reference" if method == "kiln" else "liger")


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    n, hidden, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    loss_fn = _loss_fn(spec["method"], vocab)

    # Created in their dtype and scaled in place: a temporary here (an fp32 copy, an
    # out-of-place scale) would raise the high-water mark the measurement starts from.
    g = torch.Generator(device=device).manual_seed(spec["seed"])
    h = torch.randn(n, hidden, device=device, generator=g, dtype=dtype).requires_grad_()
    # lm_head-like init (std 1/sqrt(H)): logits O(1), a realistic softmax
    w = torch.randn(vocab, hidden, device=device, generator=g, dtype=dtype).mul_(hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=device, generator=g)

    return measure_loss(lambda: loss_fn(h, w, t), h, w, spec)


# --------------------------------------------------------------------------- driver


def render(report: dict) -> str:
    m, a = report["machine"], report["args"]
    vers = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines = [f"# Linear cross-entropy memory and time ({report['device']}), {report['date']}", "",
             f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}"
             + (f"; GPU {report['gpu']}" if report.get("gpu") else ""),
             f"- versions: {vers}",
             f"- problem: N = {a['tokens']} tokens, hidden H = {a['hidden']}, {a['dtype']}, vocab V in "
             f"{', '.join(map(str, a['vocabs']))}; one forward + backward of the mean loss; torch threads "
             f"{a['threads']}; time = median of {a['reps']} runs after a warm-up run",
             f"- kiln's chunk: {report['chunk_note']}",
             f"- other processes' CPU before measuring: {report['quiet_before']:.0%} of the machine",
             f"- command: `{report['command']}`", "",
             "| vocab | method | inputs MiB | peak added MiB | first run s | median s | loss | other processes' CPU |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['vocab']} | {LABELS[r['method']]} | {r['inputs_mib']} | {r['peak_added_mib']:,.1f} | "
                     f"{r['first_s']:.2f} | {r['median_s']:.2f} | {r['loss']:.5f} | {r['other_load']:.0%} |")
    lines += ["", "| vocab | method / naive | peak memory | target | result | time | target | result | "
              "same result: abs loss diff, rel grad_weight norm diff |",
              "|---:|---|---:|---:|---|---:|---:|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['vocab']} | {c['method']} | {c['memory_ratio']:.3f}x | <= {MEMORY_TARGET}x | "
                     f"{c['memory_result']} | {c['time_ratio']:.3f}x | <= {TIME_TARGET}x | {c['time_result']} | "
                     f"{c['loss_abs_diff']:.1e}, {c['grad_weight_norm_rel_diff']:.1e} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when one is available, else the CPU")
    p.add_argument("--tokens", type=int, default=None, help="N (default 4096 on CPU, 8192 on CUDA)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 2048 on CPU, 4096 on CUDA)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 128_256], help="Llama 2 and Llama 3 sizes")
    p.add_argument("--dtype", default=None, help="input dtype (default float32 on CPU, --gpu-dtype on CUDA)")
    p.add_argument("--gpu-dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-wait", type=float, default=300, help="seconds to wait for a quiet machine per case")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from kiln.kernels.reference import CHUNK_BYTES, CHUNK_ROWS, default_chunk_size

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    args.tokens = args.tokens or (8192 if cuda else 4096)
    args.hidden = args.hidden or (4096 if cuda else 2048)
    args.dtype = args.dtype or (args.gpu_dtype if cuda else "float32")
    chunks = {v: default_chunk_size(args.tokens, v) for v in args.vocabs}
    chunk_note = (f"default_chunk_size (<= {CHUNK_ROWS} tokens, fp32 logits of one chunk <= "
                  f"{CHUNK_BYTES // 2**20} MiB): "
                  + ", ".join(f"{c} tokens ({c * v * 4 / 2**20:.0f} MiB) at V={v}" for v, c in chunks.items()))

    quiet = wait_until_quiet(args.max_wait)
    rows = []
    for vocab in args.vocabs:
        for method in METHODS[device]:
            spec = {"method": method, "vocab": vocab, "tokens": args.tokens, "hidden": args.hidden,
                    "dtype": args.dtype, "device": device, "threads": args.threads, "reps": args.reps,
                    "seed": args.seed}
            log(f"{method} V={vocab}")
            if not cuda:
                wait_until_quiet(args.max_wait)
            rows.append(run_worker(__file__, spec))
            r = rows[-1]
            log(f"  peak added {r['peak_added_mib']:.0f} MiB, median {r['median_s']:.2f} s, loss {r['loss']:.5f}, "
                f"other load {r['other_load']:.0%}")

    notes = [
        "peak added = high-water mark of the process's resident memory after the first forward + backward minus "
        "the high-water mark just after allocating the inputs (ru_maxrss; one fresh process per case). It "
        "includes the gradients both methods return: grad_hidden (N x H) and grad_weight (V x H), "
        f"{args.tokens * args.hidden * 4 / 2**20:.0f} MiB + V x {args.hidden * 4 / 2**10:.0f} KiB in fp32."
        if not cuda else
        "peak added = torch.cuda.max_memory_allocated() during the first forward + backward minus the "
        "allocation after creating the inputs; includes grad_hidden and grad_weight.",
        "naive holds the (N, V) fp32 logits for backward and, during backward, the log-softmax and the logits' "
        "gradient besides; kiln holds one chunk's (chunk, V) fp32 logits, turned in place into their gradient, "
        "and the fp32 (V, H) grad_weight accumulator, and computes all gradients in the forward.",
        "Both compute the same loss and gradients (the last table column: absolute loss difference and relative "
        "difference of grad_weight's norm, from the same seeded inputs in separate processes).",
        "'other processes' CPU' is the share of the machine used by processes outside this benchmark while a "
        "case ran; above 5% its time is not trustworthy.",
    ]
    report = {"date": date.today().isoformat(), "device": device, "machine": machine(),
              "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "versions": versions("torch", "transformers", "liger-kernel"),
              "args": {k: v for k, v in vars(args).items() if k != "worker"}, "chunk_note": chunk_note,
              "quiet_before": round(quiet, 3),
              "command": "python benchmarks/kernels_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows, "comparisons": compare_to_naive(rows, METHODS[device][1:], MEMORY_TARGET, TIME_TARGET,
                                                                 ("grad_weight_norm",)), "notes": notes}
    md = render(report)
    print(md)
    name = "kernels_memory" if not cuda else "kernels_memory_gpu"
    write_results(args.results, name, report, md, os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

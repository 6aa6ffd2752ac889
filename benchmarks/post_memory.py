"""Peak memory and time of kiln's chunked DPO loss vs the naive one on full logits.

One forward + backward of the DPO loss of B pairs from the policy's last hidden states,
`hidden (2B, T, H)` (chosen rows first) through the lm_head `weight (V, H)`, against
targets (2B, T) whose first quarter (the prompt) is ignored, with cached reference
log-probs, at vocabularies of 32k and 128k (2^15 and 2^17), measured for

(a) naive: full logits under autograd. Liger-Kernel's own per-chunk DPO loss,
    `LigerFusedLinearPreferenceBase._compute_loss` with `LigerFusedLinearDPOFunction`'s
    `preference_loss_fn` (liger-kernel 0.8.5), run on the whole batch as one chunk: the
    (2B, T, V) logits, their fp32 log-softmax, the summed target log-probs, the DPO
    loss, and backward through autograd. It is plain PyTorch, hence runs on the CPU; its
    definitions are kiln's (tests/kernels/test_preference.py). Imported, not re-typed.
(b) kiln: `kiln.kernels.linear_dpo_loss` with the backend "reference": per-token
    log-probs chunked over tokens (`reference.ChunkedLinearLogprobs`, which recomputes
    each chunk's logits in backward), then the same DPO loss.

Targets on CPU: kiln's peak memory <= 0.35 x naive, with time <= 1.2 x naive.

Memory and time are measured as in benchmarks/kernels_memory.py (its docstring): one
fresh process per case; on CPU the growth of `ru_maxrss` over the first forward +
backward, on CUDA `torch.cuda.max_memory_allocated` minus the allocation after creating
the inputs; time the median of `--reps` runs after that first one. On CUDA
(`--device cuda`, or `auto` on a GPU machine) the cases run in `--gpu-dtype` and add a
third method, `linear_dpo_loss` with the backend "liger" (Liger's fused linear
cross-entropy with reduction "none" for the token log-probs).

    python benchmarks/post_memory.py                           # CPU: B=2 pairs, T=512, H=512
    python benchmarks/post_memory.py --device cuda --seq 4096 --hidden 4096

Results are printed and written to `benchmarks/results/post_memory_<date>_<label>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import (compare_to_naive, log, machine, measure_loss, run_worker, versions,  # noqa: E402
                    wait_until_quiet, write_results)

ROOT = Path(__file__).resolve().parent.parent
MEMORY_TARGET = 0.35  # kiln peak memory <= 0.35 x naive
TIME_TARGET = 1.2  # kiln time <= 1.2 x naive
METHODS = {"cpu": ("naive", "kiln"), "cuda": ("naive", "kiln", "liger")}
LABELS = {"naive": "naive: full logits, Liger's per-chunk DPO loss on the whole batch (autograd)",
          "kiln": "kiln linear_dpo_loss, PyTorch reference (chunked)",
          "liger": "kiln linear_dpo_loss, Liger fused linear cross-entropy (reduction none)"}


# --------------------------------------------------------------------------- worker (one case, one process)


def _loss_fn(method: str, beta: float, nll_weight: float):
    """(hidden, weight, targets, ref_chosen, ref_rejected) -> scalar loss."""
    import functools

    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase

    from kiln.kernels import linear_dpo_loss

    if method == "naive":
        def naive(h, w, t, ref_chosen, ref_rejected):
            # use_ref_model=False: the cached reference log-probs go straight to the DPO loss.
            loss, _ = LigerFusedLinearPreferenceBase._compute_loss(
                h, w, t, preference_loss_fn=LigerFusedLinearDPOFunction.preference_loss_fn, full_target=t,
                alpha=nll_weight, beta=beta, compute_nll_loss=nll_weight > 0, average_log_prob=False,
                ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
            return loss
        return naive
    kiln = functools.partial(linear_dpo_loss, beta=beta, nll_weight=nll_weight,
                             backend="reference" if method == "kiln" else "liger")
    return lambda *args: kiln(*args)[0]


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    pairs, seq, hidden, vocab = spec["pairs"], spec["seq"], spec["hidden"], spec["vocab"]
    loss_fn = _loss_fn(spec["method"], spec["beta"], spec["nll_weight"])

    # In their dtype and scaled in place, as in kernels_memory.py: no temporary may raise the
    # high-water mark the measurement starts from.
    g = torch.Generator(device=device).manual_seed(spec["seed"])
    h = torch.randn(2 * pairs, seq, hidden, device=device, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, device=device, generator=g, dtype=dtype).mul_(hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (2 * pairs, seq), device=device, generator=g)
    t[:, :seq // 4] = -100  # the prompt is not scored
    # Reference log-probs: a uniform model's, -log V per scored token.
    ref = torch.full((pairs,), -(seq - seq // 4) * math.log(vocab), device=device)

    return measure_loss(lambda: loss_fn(h, w, t, ref, ref), h, w, spec)


# --------------------------------------------------------------------------- driver


def render(report: dict) -> str:
    m, a = report["machine"], report["args"]
    vers = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines = [f"# DPO loss memory and time ({report['device']}), {report['date']}", "",
             f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}"
             + (f"; GPU {report['gpu']}" if report.get("gpu") else ""),
             f"- versions: {vers}",
             f"- problem: B = {a['pairs']} pairs (2B = {2 * a['pairs']} rows) of T = {a['seq']} tokens, the first "
             f"{a['seq'] // 4} (prompt) ignored; hidden H = {a['hidden']}, {a['dtype']}, vocab V in "
             f"{', '.join(map(str, a['vocabs']))}; DPO sigmoid, beta {a['beta']}, nll_weight {a['nll_weight']}; one "
             f"forward + backward; torch threads {a['threads']}; time = median of {a['reps']} runs after a warm-up run",
             f"- kiln's chunk: {report['chunk_note']}",
             f"- other processes' CPU before measuring: {report['quiet_before']:.0%} of the machine",
             f"- command: `{report['command']}`", "",
             "| vocab | method | inputs MiB | peak added MiB | first run s | median s | loss | other processes' CPU |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['vocab']} | {LABELS[r['method']]} | {r['inputs_mib']} | {r['peak_added_mib']:,.1f} | "
                     f"{r['first_s']:.2f} | {r['median_s']:.2f} | {r['loss']:.5f} | {r['other_load']:.0%} |")
    lines += ["", "| vocab | method / naive | peak memory | target | result | time | target | result | "
              "same result: abs loss diff, rel grad_weight / grad_hidden norm diff |",
              "|---:|---|---:|---:|---|---:|---:|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['vocab']} | {c['method']} | {c['memory_ratio']:.3f}x | <= {MEMORY_TARGET}x | "
                     f"{c['memory_result']} | {c['time_ratio']:.3f}x | <= {TIME_TARGET}x | {c['time_result']} | "
                     f"{c['loss_abs_diff']:.1e}, {c['grad_weight_norm_rel_diff']:.1e} / "
                     f"{c['grad_hidden_norm_rel_diff']:.1e} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when one is available, else the CPU")
    p.add_argument("--pairs", type=int, default=2, help="B, preference pairs (2B rows)")
    p.add_argument("--seq", type=int, default=None, help="T, tokens per row (default 512 on CPU, 4096 on CUDA)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 512 on CPU, 4096 on CUDA)")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_768, 131_072])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--nll-weight", type=float, default=0.0)
    p.add_argument("--dtype", default=None, help="input dtype (default float32 on CPU, --gpu-dtype on CUDA)")
    p.add_argument("--gpu-dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--reps", type=int, default=5, help="timed runs after the warm-up (median reported)")
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
    args.seq = args.seq or (4096 if cuda else 512)
    args.hidden = args.hidden or (4096 if cuda else 512)
    args.dtype = args.dtype or (args.gpu_dtype if cuda else "float32")
    tokens = 2 * args.pairs * args.seq
    chunks = {v: default_chunk_size(tokens, v) for v in args.vocabs}
    chunk_note = (f"default_chunk_size (<= {CHUNK_ROWS} tokens, fp32 logits of one chunk <= "
                  f"{CHUNK_BYTES // 2**20} MiB): "
                  + ", ".join(f"{c} of {tokens} tokens ({c * v * 4 / 2**20:.0f} MiB) at V={v}"
                              for v, c in chunks.items()))

    quiet = wait_until_quiet(args.max_wait)
    rows = []
    for vocab in args.vocabs:
        for method in METHODS[device]:
            spec = {"method": method, "vocab": vocab, "pairs": args.pairs, "seq": args.seq, "hidden": args.hidden,
                    "beta": args.beta, "nll_weight": args.nll_weight, "dtype": args.dtype, "device": device,
                    "threads": args.threads, "reps": args.reps, "seed": args.seed}
            log(f"{method} V={vocab}")
            if not cuda:
                wait_until_quiet(args.max_wait)
            rows.append(run_worker(__file__, spec))
            r = rows[-1]
            log(f"  peak added {r['peak_added_mib']:.0f} MiB, median {r['median_s']:.2f} s, loss {r['loss']:.5f}, "
                f"other load {r['other_load']:.0%}")

    logits_mib = tokens * max(args.vocabs) * 4 / 2**20
    notes = [
        "peak added = high-water mark of the process's resident memory after the first forward + backward minus "
        "the high-water mark just after allocating the inputs (ru_maxrss; one fresh process per case). It "
        "includes the gradients both methods return: grad_hidden (2B x T x H) and grad_weight (V x H)."
        if not cuda else
        "peak added = torch.cuda.max_memory_allocated() during the first forward + backward minus the "
        "allocation after creating the inputs; includes grad_hidden and grad_weight.",
        f"naive holds the (2B, T, V) logits and their fp32 log-softmax for backward ({logits_mib:,.0f} MiB each "
        f"at V={max(args.vocabs)}) and, during backward, the gradients of both; kiln holds one chunk's fp32 logits "
        "at a time (forward, then again in backward) and the fp32 (V, H) grad_weight accumulator.",
        "kiln does one more (tokens x H) @ (H x V) matmul than naive: its backward recomputes each chunk's logits, "
        "because a token's upstream gradient depends on its whole sequence's log-prob and grad_weight sums over "
        "tokens (reference.ChunkedLinearLogprobs). What it saves is naive's passes over, and allocations of, "
        "several full (tokens, V) fp32 tensors; their share of naive's time shrinks as H grows, so kiln's time "
        "ratio rises with H towards 4/3, the matmuls' (try --hidden 2048).",
        "Both compute the same loss and gradients (the last table column: absolute loss difference and relative "
        "differences of grad_weight's and grad_hidden's norms, from the same seeded inputs in separate processes).",
        "'other processes' CPU' is the share of the machine used by processes outside this benchmark while a "
        "case ran; above 5% its time is not trustworthy.",
    ]
    report = {"date": date.today().isoformat(), "device": device, "machine": machine(),
              "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "versions": versions("torch", "transformers", "liger-kernel"),
              "args": {k: v for k, v in vars(args).items() if k != "worker"}, "chunk_note": chunk_note,
              "quiet_before": round(quiet, 3),
              "command": "python benchmarks/post_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows, "comparisons": compare_to_naive(rows, METHODS[device][1:], MEMORY_TARGET, TIME_TARGET,
                                                                 ("grad_weight_norm", "grad_hidden_norm")), "notes": notes}
    md = render(report)
    print(md)
    write_results(args.results, "post_memory" if not cuda else "post_memory_gpu", report, md, os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

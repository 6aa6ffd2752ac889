"""Sampling throughput: `kiln generate` against a plain per-prompt `model.generate` loop.

The claim (Post-training II, item 1): kiln's batched sampler generates at least as many
tokens per second as the loop everyone writes first: for each prompt in turn,
`model.generate(do_sample=True, num_return_sequences=K, ...)`, transformers' own
sampling, with the prompt rendered by the export's chat template
(`apply_chat_template(add_generation_prompt=True)`). Same model, same prompts, same K,
temperature, top-p (top-k off) and max_new_tokens. Target: kiln >= 1.0x.

Tokens are generated tokens without <|eot_id|> and padding, counted the same way on both
sides. Time is the sampling loop with the model loaded: kiln's `generate_s` from
`generate_file`'s stats (which includes writing its part file), the baseline's loop.
Each side runs once untimed (warm-up), then twice, alternating; the best of two is
reported (the machine is shared; other processes' CPU is recorded).

Model: built here with random weights (`--preset`, default `debug` on CPU and `1b` in
bf16 on CUDA, with a byte-level BPE trained here on the demo's post-training data) and
saved as an export, or `--model DIR`. A random model draws <|eot_id|> only by chance,
so nearly every completion is max_new_tokens long on both sides. Prompts: the demo's
SFT conversations without their last answer (kiln.demo.post), the first `--prompts`.

    python benchmarks/generate_throughput.py                          # CPU, debug model
    python benchmarks/generate_throughput.py --preset tiny
    python benchmarks/generate_throughput.py --device cuda            # 1b preset, bf16, static cache
    python benchmarks/generate_throughput.py --model out/run/02_sft/final

Results: `benchmarks/results/generate_throughput_<date>_<label>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

from common import Monitor, log, machine, versions, wait_until_quiet, write_results  # noqa: E402

TARGET = 1.0  # kiln tokens/s >= 1.0 x the plain loop's


def build_export(work: Path, preset: str, vocab_size: int, dtype) -> str:
    """A random-weight export of `preset` with a tokenizer trained on the demo's post-training data."""
    from kiln.curation.tokenizer import train_tokenizer
    from kiln.training.model import ModelConfig, build_model, resolve, save_hf
    from kiln.training.post.data import ChatTokenizer

    rows = [json.loads(line) for line in (work / "post" / "sft.jsonl").read_text().splitlines()]
    texts = [m["content"] for r in rows for m in r.get("messages", [])]
    train_tokenizer(texts, str(work / "tok"), vocab_size=vocab_size, log=lambda m: None)
    tok = ChatTokenizer(str(work / "tok"))
    hf = build_model(resolve(ModelConfig(preset=preset), vocab_size=tok.vocab_size), seed=0).to(dtype)
    save_hf(hf, str(work / "model"), str(work / "tok"))
    return str(work / "model")


def write_prompts(work: Path, n: int) -> tuple[str, list[list[dict]]]:
    """The first n demo SFT conversations without their last answer, as kiln generate's rows."""
    conversations = []
    for line in (work / "post" / "sft.jsonl").read_text().splitlines():
        messages = json.loads(line).get("messages")
        if messages:
            conversations.append(messages[:-1])
        if len(conversations) == n:
            break
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": m}) + "\n" for i, m in enumerate(conversations)))
    return str(path), conversations


def kiln_run(model: str, prompts: str, out: str, cfg) -> dict:
    from kiln.training.post.generate import generate_file

    with Monitor() as mon:
        stats = generate_file(model, prompts, out, cfg, log=lambda m: log(f"  kiln {m}"))
    return {"tokens": stats["this_run_tokens"], "seconds": stats["generate_s"], "wall_s": stats["wall_s"],
            "tokens_per_s": stats["this_run_tokens"] / stats["generate_s"], "other_load": mon.other_load}


class PlainLoop:
    """The baseline: transformers' tokenizer, chat template and sampling, one prompt per call."""

    def __init__(self, model: str, device, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        self.eot = self.tok.convert_tokens_to_ids("<|eot_id|>")
        self.pad = self.tok.convert_tokens_to_ids("<|pad|>")

    def run(self, conversations: list[list[dict]], args, seed: int) -> dict:
        import torch

        encoded = [self.tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt") for m in conversations]
        torch.manual_seed(seed)
        tokens = 0
        with Monitor() as mon:
            t0 = time.perf_counter()
            for enc in encoded:
                enc = enc.to(self.hf.device)
                out = self.hf.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                       top_k=0, max_new_tokens=args.max_new_tokens,
                                       num_return_sequences=args.samples, pad_token_id=self.pad,
                                       eos_token_id=self.eot)
                for row in out[:, enc["input_ids"].shape[1]:].tolist():  # up to <|eot_id|>, as kiln counts
                    tokens += row.index(self.eot) if self.eot in row else len(row)
            seconds = time.perf_counter() - t0
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "other_load": mon.other_load}


def render(report: dict) -> str:
    m, a = report["machine"], report["args"]
    vers = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    lines = [f"# Sampling throughput: kiln generate vs a per-prompt generate loop ({report['device']}), "
             f"{report['date']}", "",
             f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}"
             + (f"; GPU {report['gpu']}" if report.get("gpu") else ""),
             f"- versions: {vers}",
             f"- model: {report['model']}",
             f"- prompts: {a['prompts']} demo SFT prompts ({report['prompt_tokens']} tokens each on average); "
             f"K = {a['samples']} samples, temperature {a['temperature']}, top-p {a['top_p']}, max_new_tokens "
             f"{a['max_new_tokens']}; kiln batch_size {a['batch_size']} rows; {report['dtype']}"
             + (f"; torch threads {a['threads']}" if report["device"] == "cpu" else ""),
             f"- other processes' CPU just before a run (the most of the four): {report['quiet_before']:.0%} of the "
             "machine",
             f"- command: `{report['command']}`", "",
             "| round | method | generated tokens | seconds | tokens/s | other processes' CPU |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['round']} | {r['method']} | {r['tokens']:,} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['other_load']:.0%} |")
    lines += ["", "| kiln best tokens/s | plain loop best tokens/s | ratio | target | result |",
              "|---:|---:|---:|---:|---|",
              f"| {report['kiln_best']:,.0f} | {report['plain_best']:,.0f} | {report['ratio']:.2f}x | "
              f">= {TARGET}x | {'PASS' if report['ratio'] >= TARGET else 'MISS'} |",
              "", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when one is available, else the CPU")
    p.add_argument("--model", help="an existing causal LM export (default: build a random one of --preset)")
    p.add_argument("--preset", help="model preset to build (default: debug on CPU, 1b on CUDA)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    p.add_argument("--prompts", type=int, default=64, help="prompts sampled")
    p.add_argument("--samples", type=int, default=4, help="K, completions per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="kiln's rows (prompt x sample) per generate call")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (default 1: a debug model's matmuls are microseconds, and a second "
                        "spinning thread costs more than it gives on a shared 2-core machine; both sides use it)")
    p.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet machine per run")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # generate_file takes the GPU whenever it sees one

    import torch

    from kiln.demo.post import build_post_data
    from kiln.training.post.data import ChatTokenizer
    from kiln.training.post.generate import SamplingConfig, read_prompts

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # what generate_file uses
    if not cuda:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("1b" if cuda else "debug")
    cfg = SamplingConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=0, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-generate-") as tmp:
        work = Path(tmp)
        build_post_data(str(work / "post"))
        model = args.model or build_export(work, args.preset, args.vocab_size, dtype)
        prompts, conversations = write_prompts(work, args.prompts)
        items, _ = read_prompts(prompts, ChatTokenizer(model), 1 << 30, args.max_new_tokens)
        prompt_tokens = round(sum(len(x.ids) for x in items) / len(items))
        plain = PlainLoop(model, device, dtype)
        n_params = sum(t.numel() for t in plain.hf.parameters())
        log(f"model {model}: {n_params:,} parameters; {len(items)} prompts, {prompt_tokens} tokens on average")

        log("warm-up (untimed)")
        plain.run(conversations[:2], args, seed=0)
        warm = work / "warm_prompts.jsonl"
        warm.write_text("".join(Path(prompts).read_text().splitlines(keepends=True)[:2]))
        kiln_run(model, str(warm), str(work / "warm.jsonl"), cfg)
        rows, quiet = [], []
        for round_ in (1, 2):
            quiet.append(wait_until_quiet(args.max_wait))
            rows.append({"round": round_, "method": "plain loop", **plain.run(conversations, args, seed=round_)})
            log(f"round {round_}: plain loop {rows[-1]['tokens_per_s']:,.0f} tokens/s")
            quiet.append(wait_until_quiet(args.max_wait))
            rows.append({"round": round_, "method": "kiln generate",
                         **kiln_run(model, prompts, str(work / f"kiln-{round_}.jsonl"), cfg)})
            log(f"round {round_}: kiln generate {rows[-1]['tokens_per_s']:,.0f} tokens/s")

    kiln_best = max(r["tokens_per_s"] for r in rows if r["method"] == "kiln generate")
    plain_best = max(r["tokens_per_s"] for r in rows if r["method"] == "plain loop")
    notes = [
        f"plain loop: for each prompt, `model.generate(do_sample=True, temperature, top_p, top_k=0, "
        f"num_return_sequences={args.samples}, max_new_tokens, eos_token_id=<|eot_id|>)` on the chat template's "
        "ids: one prompt's K rows per call, the dynamic cache, transformers' multinomial sampling.",
        f"kiln generate: `generate_file` with batch_size {args.batch_size} rows (prompt x sample), left padded, "
        + ("bf16 and the static cache (transformers compiles the decoding step: the measured run includes its "
           "compilation for the freshly loaded model)" if cuda else "fp32 and the dynamic cache")
        + "; temperature and top-p warpers then per-row Gumbel noise (one generator per row) and greedy selection; "
        "its time includes writing the part file (one JSON line per prompt).",
        "Random weights: a completion ends early only when <|eot_id|> is drawn by chance (about 1 / vocabulary a "
        f"token), so both sides generate close to {args.prompts} x {args.samples} x {args.max_new_tokens} tokens; "
        "with a trained model, rows that end early keep their batch slot until the batch's longest row ends (kiln) "
        "or the prompt's (plain loop).",
        "'other processes' CPU' is the share of the machine used by processes outside this benchmark during a run; "
        "above 5% its rate is not trustworthy.",
    ]
    report = {"date": date.today().isoformat(), "device": device, "machine": machine(),
              "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "versions": versions("torch", "transformers"), "args": vars(args),
              "model": (args.model or f"random `{args.preset}` preset, vocabulary {args.vocab_size}")
              + f", {n_params:,} parameters", "dtype": str(dtype).replace("torch.", ""),
              "prompt_tokens": prompt_tokens, "quiet_before": round(max(quiet), 3),
              "command": "python benchmarks/generate_throughput.py " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:]),
              "rows": rows, "kiln_best": kiln_best, "plain_best": plain_best, "ratio": kiln_best / plain_best,
              "notes": notes}
    md = render(report)
    print(md)
    write_results(args.results, "generate_throughput" if not cuda else "generate_throughput_gpu", report, md,
                  os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

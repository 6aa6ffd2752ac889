"""`kiln recipe ...`: the published pipelines (recipes/<system>/) end to end.

    kiln recipe list                                       the systems and their parts
    kiln recipe run recipes/llama3 --scale tiny            curate -> mix -> pretrain -> post
    kiln recipe run recipes/qwen2 --scale tiny --parts pretrain post
    kiln recipe table recipes/llama3 recipes/qwen2 --scale tiny    one table of what the runs ended with

A system directory holds up to five recipes, each a recipe of its part as written for
the paper's scale, with `[scale.tiny]` overlays for a run on the demo's data:

    curate.toml    kiln curate pipeline   the report's filters, dedup and classifiers
    mix.toml       a mixture file          (contract 4) the domains' weights
    teacher.toml   kiln train             the model a distilled one learns from (Gemma 2, AFM), if any
    pretrain.toml  kiln train             the report's pretraining stages
    post.toml      kiln train             the report's post-training stages

Each part runs as its own `kiln` command in a child process (curation's Spark and
training's torch never share one), and each reuses finished work on a relaunch: the
pipeline its finished stages, training its finished stages and newest checkpoints.
This module sits above the parts: it starts their commands and reads their outputs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import textwrap
import time

from kiln.config import ConfigError

PARTS = ("curate", "mix", "teacher", "pretrain", "post")
FILES = {"curate": "curate.toml", "mix": "mix.toml", "teacher": "teacher.toml", "pretrain": "pretrain.toml",
         "post": "post.toml"}
TRAINING = ("teacher", "pretrain", "post")
MAX_EPOCHS = 4  # the mix step flags a domain repeated more often than this
DESCRIPTION = ("Run a published pipeline: recipes/<system>/ holds that report's curation, mixture, pretraining and "
               "post-training as kiln recipes. --scale tiny runs every part on the demo's data (make demo first) on a "
               "laptop; --scale paper is the report's own scale, for `kiln plan`, not for this machine.")


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="run a published pipeline (recipes/<system>/): curate, mix, pretrain, post",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="action", required=True)
    q = commands.add_parser("list", help="the systems under a recipes directory and their parts")
    q.add_argument("root", nargs="?", default="recipes", help="directory of system directories (default recipes)")
    q = commands.add_parser("run", help="run a system's parts in order, reusing finished work")
    q.add_argument("system", help="a system directory, e.g. recipes/llama3")
    q.add_argument("--scale", default="tiny", help="the recipes' scale (default tiny; paper needs a cluster)")
    q.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="the parts to run, in pipeline order (default: all that the directory has)")
    q.add_argument("--force", action="store_true", help="recompute curation instead of reusing finished stages")
    q = commands.add_parser("table", help="one table of the systems' finished stages (tokens, losses, metrics)")
    q.add_argument("systems", nargs="+", help="system directories")
    q.add_argument("--scale", default="tiny", help="the scale they ran at (default tiny)")
    q.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")


def run(args) -> int:
    if args.action == "list":
        return list_systems(args.root)
    if args.action == "table":
        rows = [row for system in args.systems for row in stage_rows(system, args.scale)]
        text = markdown_table(rows)
        print(text)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return 0
    return run_system(args.system, args.scale, args.parts, args.force)


def system_parts(system: str) -> dict[str, str]:
    if not os.path.isdir(system):
        raise ConfigError(f"{system}: not a directory (a system directory such as recipes/llama3)")
    parts = {part: os.path.join(system, name) for part, name in FILES.items()
             if os.path.isfile(os.path.join(system, name))}
    if not parts:
        raise ConfigError(f"{system}: none of {', '.join(FILES.values())} is there")
    return parts


def list_systems(root: str) -> int:
    for system in sorted(glob.glob(os.path.join(root, "*", ""))):
        try:
            parts = system_parts(system.rstrip("/"))
        except ConfigError:
            continue
        title = ""
        readme = os.path.join(system, "README.md")
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                title = f.readline().lstrip("# ").strip()
        print(f"{system.rstrip('/'):<24} {' '.join(parts):<28} {title}")
    return 0


def kiln_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", *argv]


def run_system(system: str, scale: str, wanted: list[str], force: bool) -> int:
    parts = system_parts(system)
    missing = [p for p in wanted if p not in parts]
    if missing and wanted != list(PARTS):
        raise ConfigError(f"{system}: no {', '.join(FILES[p] for p in missing)}")
    todo = [p for p in PARTS if p in wanted and p in parts]
    check_scales(parts, todo, scale)
    t0 = time.time()
    for part in todo:
        print(f"[recipe] {system}: {part} ({parts[part]}, scale {scale})", flush=True)
        t = time.time()
        if part == "mix":
            check_mixture(parts, scale)
        else:
            argv = (["curate", "pipeline", parts[part]] + (["--force"] if force else [])) if part == "curate" \
                else ["train", parts[part]]
            call = subprocess.run(kiln_command(*argv, "--scale", scale))
            if call.returncode:
                print(f"kiln: error: {system}: the {part} part failed (exit {call.returncode}); fix it and rerun "
                      f"`kiln recipe run {system} --scale {scale}`: finished work is reused", file=sys.stderr)
                return call.returncode
        print(f"[recipe] {system}: {part} done in {time.time() - t:.0f} s", flush=True)
    print(f"[recipe] {system}: {', '.join(todo)} finished in {time.time() - t0:.0f} s")
    print(markdown_table(stage_rows(system, scale)))
    return 0


def check_scales(parts: dict[str, str], todo: list[str], scale: str) -> None:
    """Every part's recipe resolves at `scale` before the first part starts."""
    from kiln.config import apply_scale, load_toml
    from kiln.training.recipe import load

    for part in todo:
        if part in TRAINING:
            load(parts[part], scale)
        elif part == "curate":
            from kiln.curation.pipeline import parse_recipe

            parse_recipe(apply_scale(load_toml(parts[part]), scale, parts[part]), where=parts[part])


def check_mixture(parts: dict[str, str], scale: str) -> None:
    """The mixture against the curated tokens: each domain's weight, the tokens the
    pretraining stages that use mix.toml take from it, the tokens curation made, and
    the epochs that makes (Llama 3 and Qwen 2 repeat high-quality domains a few times)."""
    from kiln.formats.mixture import load_mixture
    from kiln.training.recipe import load

    mixture = load_mixture(parts["mix"])
    print(f"[mix] {parts['mix']}: " + ", ".join(f"{d} {w:.3f}" for d, w in mixture.weights.items()))
    if "pretrain" not in parts:
        return
    recipe = load(parts["pretrain"], scale)
    mix_path = os.path.abspath(parts["mix"])
    base = os.path.dirname(os.path.abspath(parts["pretrain"]))
    users = [s for s in recipe.stages if s.mixture and os.path.abspath(os.path.join(base, s.mixture)) == mix_path]
    taken = {d: sum(s.tokens for s in users) * w for d, w in mixture.weights.items()}
    availability = os.path.join(recipe.run.shards, "availability.json")
    if not os.path.isfile(availability):
        print(f"[mix] {availability} is not there yet (curate first): tokens per domain not checked")
        return
    with open(availability, encoding="utf-8") as f:
        have = json.load(f)
    have = {d: info["tokens"] for d, info in have.get("domains", {}).items()}
    absent = [d for d, w in mixture.weights.items() if w > 0 and not have.get(d)]
    if absent:
        raise ConfigError(f"{parts['mix']}: domain(s) {', '.join(absent)} have weight but no tokens in {availability}")
    for d, w in mixture.weights.items():
        if w > 0:
            epochs = taken[d] / have[d]
            print(f"[mix]   {d:<14} weight {w:.3f}  takes {taken[d]:>14,.0f} tokens of {have[d]:>14,}"
                  f"  ({epochs:.2f} epochs) in {', '.join(s.name for s in users) or 'no stage'}"
                  + (f"  -- more than {MAX_EPOCHS} epochs: repeated data stops helping (Muennighoff et al. 2023)"
                     if epochs > MAX_EPOCHS else ""))


def stage_rows(system: str, scale: str) -> list[dict]:
    """One row per finished training stage of the system's pretrain and post recipes."""
    from kiln.training.recipe import load

    rows = []
    parts = system_parts(system)
    for part in TRAINING:
        if part not in parts:
            continue
        recipe = load(parts[part], scale)
        for path in sorted(glob.glob(os.path.join(recipe.run.output, "[0-9][0-9]_*", "final", "kiln_stage.json"))):
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
            stage_dir = os.path.dirname(os.path.dirname(path))
            summary = {**last_validation(os.path.join(stage_dir, "metrics.jsonl")), **summary}
            rows.append({"system": os.path.basename(system.rstrip("/")), "part": part,
                         "stage": os.path.basename(stage_dir),
                         "tokens": summary.get("tokens"), "final_loss": summary.get("final_loss"),
                         "metrics": headline_metrics(summary)})
    return rows


def last_validation(metrics_file: str) -> dict:
    """The last record of a stage's metrics.jsonl that holds validation measures."""
    last: dict = {}
    if os.path.isfile(metrics_file):
        with open(metrics_file, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if any(k.startswith("val/") for k in record):
                    last = {k: v for k, v in record.items() if k.startswith("val/")}
    return last


HEADLINE = ("accuracy", "bpb", "kl", "reward", "sft/loss")  # val/ measures shown, by the end of their name
SAMPLING = ("kept", "samples_per_kept", "reward_gain", "heldout_reward")  # a rejection-sampling stage's


def headline_metrics(summary: dict) -> str:
    """The few numbers a stage is judged by: held-out accuracy, bits per byte, KL or
    reward; a rejection-sampling stage's yield and reward gain."""
    picks = [f"{key.removeprefix('val/')} {value:.4g}" for key, value in summary.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)
             and (key.startswith("val/") and key.endswith(HEADLINE) or key in SAMPLING)]
    return "; ".join(picks[:4])


def markdown_table(rows: list[dict]) -> str:
    lines = ["| system | part | stage | tokens | final loss | metrics |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        loss = f"{r['final_loss']:.3f}" if isinstance(r["final_loss"], (int, float)) else "-"
        tokens = f"{r['tokens']:,}" if isinstance(r["tokens"], int) else "-"
        lines.append(f"| {r['system']} | {r['part']} | {r['stage']} | {tokens} | {loss} | {r['metrics']} |")
    return "\n".join(lines)

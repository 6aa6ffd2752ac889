"""Probe cost: `kiln probe run` against the same arms launched as separate `kiln train` runs.

The claim (issue 11): the probe's bookkeeping (planning, the arms' keys and reuse,
evaluation, the verdict) costs nothing extra: a probe of 3 candidates x 3 seeds takes no
longer than its 12 arms trained one `kiln train` at a time. Target: probe / separate
<= 1.0x. Also reported: the share of the probe's wall time spent outside optimizer
steps (train_step, timed by wrapping the trainer's own function in the probe process).

Both sides start from the same base (the demo probe's half-way checkpoint, exported
once, untimed) and the same candidate data (the filter stage's drops tokenized once,
untimed); each side writes into a fresh directory (the set-up's arms in one of their own, so
the timed probe reuses none). The separate runs are the recipes
the probe itself builds (`kiln.probe.run.arm_recipe`), written as TOML, so both sides
train exactly the same arms; they do not evaluate (a user of separate runs would still
have to). Run on the demo's shards (make demo first):

    python benchmarks/probe_cost.py

Results: `benchmarks/results/probe_cost_<date>_<host>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import log, machine, versions, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILN = [sys.executable, "-m", "kiln.cli"]

# Runs the probe in a process of its own, timing the trainer's and the probe's own
# functions (each wrapped where its module looks it up) for the breakdown.
DRIVER = """
import json, sys, time
import kiln.probe.run as p
import kiln.training.train as t
from kiln.probe import config
spent = {}
def timer(module, name, label):
    inner = getattr(module, name)
    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
    setattr(module, name, timed)
for module, name, label in ((t, "train_step", "optimizer steps"), (t, "start_run", "run start (shards opened)"),
                            (t, "setup_stage", "stage set-up (model loaded)"), (t, "validate", "trainer validation"),
                            (t, "save_checkpoint", "checkpoints"), (t, "finish_stage", "export"),
                            (p, "_evaluate", "probe evaluation"), (p, "plan", "plan")):
    timer(module, name, label)
t0 = time.perf_counter()
p.run(config.load(sys.argv[1]))
print(json.dumps({"wall": time.perf_counter() - t0, "steps": spent.pop("optimizer steps"), "parts": spent}))
"""


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def recipe_toml(recipe) -> str:
    import dataclasses

    lines = []
    for section in ("run", "model", "parallel", "optimizer", "kernels"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(getattr(recipe, section)).items()]
    for stage in recipe.stages:
        lines.append("[[stage]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(stage).items()
                  if not (k in ("mixture",) and not v)]
    return "\n".join(lines) + "\n"


def probe_file(out: Path, base: str, spam_shards: str, seeds: int) -> Path:
    text = (ROOT / "recipes" / "probe_demo.toml").read_text()
    head, rest = text.split("[[candidate]]", 1)
    keep = [line for line in head.splitlines() if not line.startswith(("output", "base_recipe", "base_stage",
                                                                         "base_step", "seeds"))]
    text = "\n".join(keep).replace("[probe]", f'[probe]\noutput = "{out}"\nbase = "{base}"\nseeds = {seeds}')
    text += "\n[[candidate]]" + rest.replace('documents = "out/demo/03_filter/dropped"', f'shards = "{spam_shards}"')
    path = out.parent / f"{out.name}.toml"
    path.write_text(text.replace('"probe_base.toml"', '"recipes/probe_base.toml"'))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/bench/probe_cost", help="scratch directory (emptied)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from kiln.probe import config
    from kiln.probe.run import arm_recipe, arms, plan

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if not (ROOT / "out/demo/12_tokenize/shards/availability.json").exists():
        log("no demo shards: run make demo first")
        return 2
    # Untimed set-up: the demo probe's base and its spam candidate's shards.
    log("set-up: the demo probe's base and candidate shards (kiln probe run recipes/probe_demo.toml)")
    subprocess.run([*KILN, "probe", "run", "recipes/probe_demo.toml", "--seeds", "1", "--output",
                    str(work / "setup"), "--arms", str(work / "setup_arms")], cwd=ROOT, check=True,
                   capture_output=True)
    base = str(ROOT / "out/probe/base/01_core/checkpoints/step-00000059")
    spam = next((work / "setup" / "candidates").glob("filtered_spam-*")) / "02_tokenize" / "shards"

    probe_path = probe_file(work / "probe", base, str(spam), args.seeds)
    # Planning here (untimed) exports the base checkpoint once, into the probe's output:
    # the timed probe finds it, and the separate runs start from the same export.
    planned = plan(config.load(str(probe_path)), log=lambda m: None)
    log(f"probe: {probe_path}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(probe_path)], cwd=ROOT, capture_output=True, text=True)
    probe_wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return 1
    inner = json.loads(proc.stdout.strip().splitlines()[-1])

    separate_dir = work / "separate"
    separate_dir.mkdir()
    recipes = []
    for i, arm in enumerate(arms(planned)):
        arm.dir = str(separate_dir / f"arm{i:02d}")
        path = separate_dir / f"arm{i:02d}.toml"
        path.write_text(recipe_toml(arm_recipe(planned, arm)))
        recipes.append(path)
    log(f"separate: {len(recipes)} kiln train runs")
    t0 = time.perf_counter()
    for path in recipes:
        subprocess.run([*KILN, "train", str(path)], cwd=ROOT, check=True, capture_output=True)
    separate_wall = time.perf_counter() - t0

    ratio = probe_wall / separate_wall
    outside = 1 - inner["steps"] / inner["wall"]
    report = {"date": date.today().isoformat(), "machine": machine(), "versions": versions("torch", "transformers"),
              "arms": len(recipes), "seeds": args.seeds, "tokens_per_arm": planned.probe.probe.tokens,
              "probe_wall_s": round(probe_wall, 2), "probe_inner_wall_s": round(inner["wall"], 2),
              "probe_optimizer_steps_s": round(inner["steps"], 2), "probe_parts_s": inner["parts"],
              "separate_wall_s": round(separate_wall, 2),
              "ratio": round(ratio, 3), "outside_steps_fraction": round(outside, 3), "target": "ratio <= 1.0"}
    md = "\n".join([
        f"# Probe cost ({report['date']}, {report['machine']['nproc']} cores, {report['machine']['cpu']})", "",
        "`python benchmarks/probe_cost.py`: the demo probe's 3 candidates x "
        f"{args.seeds} seeds + control ({len(recipes)} arms of {report['tokens_per_arm']:,} tokens, debug model, CPU)",
        "", "| | wall (s) |", "|---|---|",
        f"| `kiln probe run` (plan, {len(recipes)} arms, evaluation, verdict; one process) | {probe_wall:.1f} |",
        f"| the same {len(recipes)} arms as separate `kiln train` runs (no evaluation) | {separate_wall:.1f} |",
        f"| **ratio probe / separate** (target <= 1.0) | **{ratio:.2f}x** |", "",
        f"Inside the probe process: {inner['wall']:.1f} s, of which {inner['steps']:.1f} s in optimizer steps "
        f"(`train_step`): **{outside:.0%} of the probe's time is outside optimizer steps** (model loading, "
        "checkpoints, exports, evaluation, planning), at this tiny scale where a step takes milliseconds:", "",
        "| outside optimizer steps | s |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in sorted(inner["parts"].items(), key=lambda kv: -kv[1])],
        f"| the rest (progress lines, metrics, arm bookkeeping, verdict, plot) | "
        f"{inner['wall'] - inner['steps'] - sum(inner['parts'].values()):.1f} |", ""])
    print(md)
    if not args.no_write:
        write_results(args.out, "probe_cost", report, md, os.cpu_count() or 0)
    return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

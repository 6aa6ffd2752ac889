"""`kiln probe run PROBE.toml` and `kiln probe report OUT`.

    kiln probe run recipes/probe_demo.toml                    every arm, then the verdict
    kiln probe run P.toml --seeds 5 --output out/probe/p5     options override [probe] keys (one per key)
    kiln probe run P.toml --set probe.default='{general=0.7,code=0.3}'   any key of the file
    kiln probe report out/probe/demo --decisions              re-print, re-plot, decision accuracy
    torchrun --nproc_per_node=8 -m kiln.probe P.toml          the arms with FSDP2 on 8 GPUs
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = ("Annealing probes: anneal a base model (LR linearly to 0) on the default mixture and on each "
               "candidate dataset mixed into it, over paired seeds, and say with intervals whether each candidate "
               "helps, hurts or has no detectable effect.")

# Keys that replace one another: an option giving one drops the file's other.
ALTERNATIVES = (("base", ("base_recipe", "base_stage", "base_step")), ("base_recipe", ("base",)),
                ("default_mixture", ("default",)))


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="annealing probes: does a dataset help? (paired seeds, intervals, a verdict)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    commands = p.add_subparsers(dest="probe_command", required=True)
    add_run_arguments(commands.add_parser("run", help="plan, train every arm, write results.csv and verdict.json",
                                          description=DESCRIPTION))
    r = commands.add_parser("report", help="re-print a probe's verdict and plot; --decisions for decision accuracy")
    r.add_argument("output", help="a probe's output directory (results.csv, verdict.json)")
    r.add_argument("--decisions", action="store_true",
                   help="bootstrap over the seeds run: P(each pairwise ranking of candidates holds with new seeds)")
    r.add_argument("--primary", help="the metric to rank on (default: the probe's primary)")
    r.add_argument("--no-plot", action="store_true", help="do not rewrite verdict.png")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    from kiln.config import add_config_options
    from kiln.probe.config import ProbeConfig

    p.add_argument("probe", help="probe TOML: [probe], [[candidate]], [[eval]] (see recipes/probe_demo.toml)")
    add_config_options(p, ProbeConfig, "probe")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="set_values",
                   help="set any key of the file, e.g. probe.default={general=0.7,code=0.3} or parallel.mixed_precision"
                        "=bf16 (repeatable; the value is read as TOML); options override --set")


def probe_for(args):
    """The probe a command runs: the file, then --set, then the options (an option naming
    the base or the default mixture replaces the file's other way of giving it)."""
    from kiln.config import config_overrides, load_toml, merge, parse_set
    from kiln.probe import config

    data = load_toml(args.probe)
    for override in (parse_set(args.set_values), config_overrides(args)):
        given = override.get("probe", {})
        table = dict(data.get("probe", {}))
        for key, others in ALTERNATIVES:
            if key in given:
                for other in others:
                    if other not in given:
                        table.pop(other, None)
        # [probe] keys are replaced whole (an inline default mixture is not merged weight by weight)
        data = {**merge(data, {k: v for k, v in override.items() if k != "probe"}), "probe": {**table, **given}}
    return config.parse(data, where=args.probe, base_dir=os.path.dirname(os.path.abspath(args.probe)))


def run(args) -> int:
    if args.probe_command == "report":
        return report(args)
    from kiln.probe.run import run as run_probe

    verdict = run_probe(probe_for(args))
    return 0 if verdict is not None else 1


def report(args) -> int:
    from kiln.formats.probe import RESULTS_FILE, VERDICT_FILE, read_results, read_verdict
    from kiln.probe.report import PLOT_FILE, decisions, format_decisions, format_table, plot
    from kiln.probe.verdict import judge

    verdict = read_verdict(os.path.join(args.output, VERDICT_FILE))
    rows = read_results(os.path.join(args.output, RESULTS_FILE)).to_dicts()
    primary = args.primary or verdict["primary"]
    metrics = [c for c in rows[0] if c not in ("arm", "seed")] if rows else []
    # Judged again from results.csv: it may hold arms a stopped run finished after the last verdict.
    verdict = {**verdict, **judge(rows, metrics, primary)}
    print(format_table(verdict))
    if not args.no_plot:
        plot(verdict, os.path.join(args.output, PLOT_FILE))
        print(f"wrote {os.path.join(args.output, PLOT_FILE)}")
    if args.decisions:
        print(format_decisions(decisions(rows, primary), primary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kiln.probe PROBE.toml [options]`: what torchrun starts on every rank."""
    from kiln.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m kiln.probe", description=DESCRIPTION)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.probe_command = "run"
    try:
        return run(args)
    except ConfigError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2

"""Reading a probe: the printed table, the plot, and decision accuracy.

    kiln probe report OUT               re-print the verdict (and rewrite the plot)
    kiln probe report OUT --decisions   how likely each pairwise ranking holds with new seeds

Decision accuracy (DataDecide measured it over many datasets; here it is estimated
for this probe): the seeds already run are resampled with replacement, the same draw
for every arm (the pairing is kept), and each pair of candidates is ranked again on
the primary metric's mean paired difference. The share of resamples that agree with
the observed ranking estimates the probability that the ranking holds with a new
set of seeds. With one seed there is nothing to resample. Below five seeds the
bootstrap is coarse (three seeds have ten distinct resamples), so a t-based predictive
probability is printed beside it (`predictive`).
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from kiln.config import ConfigError
from kiln.formats.probe import CONTROL, higher_is_better

PLOT_FILE = "verdict.png"
DECISION_RESAMPLES = 10_000


def _num(value, spec: str = "+.4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(verdict: dict) -> str:
    """Per candidate and metric: the paired difference against the control, its 95 %
    interval, the control's seed-to-seed standard deviation and the verdict; then the
    ranking on the primary metric."""
    header = f"{'candidate':<16} {'metric':<28} {'delta':>9}  {'95% interval':<21} {'control sd':>10}  verdict"
    title = (f"probe verdict (delta = candidate - control, paired over {len(verdict.get('seeds', []))} seed(s); "
             f"primary {verdict['primary']})")
    lines = [title, header, "-" * len(header)]
    for name, metrics in verdict["candidates"].items():
        for metric, c in metrics.items():
            interval = f"[{_num(c['lower'])}, {_num(c['upper'])}]"
            note = c["verdict"]
            if c["method"] == "none":
                note += " (one seed: no interval; run 2 or more)"
            elif c["verdict"] == "no detectable effect":
                note += (f" ({c['seeds_needed']} seeds would resolve an effect this size)" if c.get("seeds_needed")
                         else " (too small to resolve)")
            lines.append(f"{name:<16} {metric + (' *' if metric == verdict['primary'] else ''):<28} "
                         f"{_num(c['delta']):>9}  {interval:<21} {_num(c['control_sd'], '.4f'):>10}  {note}")
    lines.append("bits per byte (val:DOMAIN, eval:NAME): lower is better; :accuracy and :p_correct: higher is better; "
                 "* the primary metric")
    lines.append("ranking on " + verdict["primary"] + ": " + " > ".join(verdict["ranking"]))
    return "\n".join(lines)


def plot(verdict: dict, path: str) -> None:
    """One panel per metric: each candidate's delta with its interval, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(verdict["candidates"])
    metrics = sorted({m for c in verdict["candidates"].values() for m in c},
                     key=lambda m: (m != verdict["primary"], m))
    if not metrics:
        return
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.5 + 0.45 * len(names) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        ys, deltas, errs, colors = [], [], [[], []], []
        for y, name in enumerate(names):
            c = verdict["candidates"][name].get(metric)
            if c is None:
                continue
            lo = c["lower"] if c["lower"] is not None else c["delta"]
            hi = c["upper"] if c["upper"] is not None else c["delta"]
            ys.append(y)
            deltas.append(c["delta"])
            errs[0].append(c["delta"] - lo)
            errs[1].append(hi - c["delta"])
            colors.append({"helps": "tab:green", "hurts": "tab:red"}.get(c["verdict"], "tab:gray"))
        for y, d, e0, e1, color in zip(ys, deltas, errs[0], errs[1], colors):
            ax.errorbar([d], [y], xerr=[[e0], [e1]], fmt="o", color=color, capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        better = "higher" if higher_is_better(metric) else "lower"
        ax.set_title(f"{metric}{' (primary)' if metric == verdict['primary'] else ''}\n{better} is better",
                     fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("candidate - control, 95 % intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decisions(rows: list[dict], primary: str, resamples: int = DECISION_RESAMPLES, seed: int = 0) -> list[dict]:
    """For each pair of candidates: the observed order on `primary` and the bootstrap
    probability that it holds (see the module docstring)."""
    by_arm: dict[str, dict[int, float]] = {}
    for row in rows:
        value = row.get(primary)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            by_arm.setdefault(row["arm"], {})[int(row["seed"])] = float(value)
    if CONTROL not in by_arm:
        raise ConfigError(f"no control arm with {primary} in the results")
    candidates = [a for a in by_arm if a != CONTROL]
    seeds = sorted(set(by_arm[CONTROL]).intersection(*(by_arm[c] for c in candidates))) if candidates else []
    if len(seeds) < 2:
        raise ConfigError(f"decision accuracy needs at least 2 seeds that every arm finished (have {len(seeds)})")
    sign = 1.0 if higher_is_better(primary) else -1.0
    diffs = {c: np.array([by_arm[c][s] - by_arm[CONTROL][s] for s in seeds]) for c in candidates}  # (seeds,)
    draws = np.random.default_rng(seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    means = {c: d[draws].mean(axis=1) for c, d in diffs.items()}  # (resamples,)
    out = []
    for a, b in combinations(candidates, 2):
        observed = sign * (diffs[a].mean() - diffs[b].mean())
        first, second = (a, b) if observed >= 0 else (b, a)
        agree = float(np.mean(sign * (means[first] - means[second]) > 0))
        out.append({"better": first, "worse": second, "margin": abs(float(diffs[a].mean() - diffs[b].mean())),
                    "probability": agree, "predictive": predictive(diffs[first] - diffs[second], sign),
                    "seeds": len(seeds)})
    return out


def predictive(d: np.ndarray, sign: float) -> float:
    """P(a new set of n seeds gives a mean of the same sign as d's), d the per-seed
    differences between two arms: the new mean minus the observed one is t-distributed
    with scale s * sqrt(2 / n) (both means carry the seed noise). Unlike the bootstrap
    it is not coarse with few seeds: three seeds that agree have ten distinct
    resamples, all agreeing, however close to 0 they are."""
    from scipy.stats import t

    n, mean, sd = len(d), float(sign * d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return 1.0 if mean != 0 else 0.5
    return float(t.cdf(abs(mean) / (sd * math.sqrt(2 / n)), n - 1))


def format_decisions(pairs: list[dict], primary: str) -> str:
    lines = [f"decision accuracy on {primary} (bootstrap over seeds: P(the ranking holds with new seeds))"]
    for d in pairs:
        lines.append(f"  {d['better']} > {d['worse']}: bootstrap {d['probability']:.2f}, t predictive "
                     f"{d['predictive']:.2f}  (margin {d['margin']:.4f}, {d['seeds']} seeds)")
    if not pairs:
        lines.append("  (one candidate: nothing to rank)")
    return "\n".join(lines)

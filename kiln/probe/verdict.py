"""The probe's verdict: paired differences of each candidate against the control, with
intervals, as a measurement rather than a single comparison.

A seed gives the control and every candidate arm the same default-mix data, so the
differences are paired: for candidate c, metric m and seed s,
d_s = m(c, s) - m(control, s). Over the seeds the mean difference gets a 95 % interval:
Student's t with n - 1 degrees of freedom for few seeds, a percentile bootstrap of the
mean from five seeds on (t assumes normal differences, which five or more seeds no
longer need). An interval that excludes 0 is a verdict, `helps` or `hurts` by the
metric's direction (bits per byte: lower is better); one that straddles 0 is `no
detectable effect`, with the number of seeds a difference of that size would need
for its t interval to exclude 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from kiln.config import ConfigError
from kiln.formats.probe import CONTROL, higher_is_better

LEVEL = 0.95
BOOTSTRAP_FROM = 5  # seeds from which the interval is a bootstrap instead of t
BOOTSTRAP_RESAMPLES = 10_000
MAX_SEEDS_ADVISED = 1_000  # beyond this an effect is "too small to resolve" rather than a count
HELPS, HURTS, NO_EFFECT = "helps", "hurts", "no detectable effect"


@dataclass
class Comparison:
    delta: float  # mean paired difference, candidate minus control
    lower: float  # interval around delta (nan with one seed)
    upper: float
    seeds: int  # paired seeds
    method: str  # "t", "bootstrap" or "none" (one seed)
    control_sd: float  # the control's seed-to-seed standard deviation of the metric
    verdict: str  # helps / hurts / no detectable effect
    better: str  # "lower" or "higher": which direction of the metric is an improvement
    seeds_needed: int | None = None  # for no detectable effect: seeds a t interval would need; None = unresolvable

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def t_interval(diffs: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    from scipy.stats import t

    n = len(diffs)
    half = t.ppf(0.5 + level / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n)
    return float(diffs.mean() - half), float(diffs.mean() + half)


def bootstrap_interval(diffs: np.ndarray, level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean over resamples of the seeds (seeded: a rerun
    prints the same interval)."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, 0.5 - level / 2)), float(np.quantile(means, 0.5 + level / 2))


def seeds_needed(delta: float, sd: float, level: float = LEVEL) -> int | None:
    """The fewest seeds n whose t interval, half-width t(n-1) * sd / sqrt(n), would
    exclude 0 for a mean difference `delta` of this spread; None when no practical
    number would (no difference, or more than MAX_SEEDS_ADVISED)."""
    from scipy.stats import t

    if delta == 0 or not math.isfinite(delta) or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS_ADVISED + 1):
        if t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) < abs(delta):
            return n
    return None


def compare(candidate: dict[int, float], control: dict[int, float], metric: str) -> Comparison:
    """`candidate` and `control`: seed -> the metric's value. Seeds missing from either
    arm (an arm still running) are left out of the pairing."""
    seeds = sorted(set(candidate) & set(control))
    if not seeds:
        raise ConfigError(f"{metric}: no seed has both the candidate and the control")
    diffs = np.array([candidate[s] - control[s] for s in seeds], dtype=np.float64)
    controls = np.array([control[s] for s in seeds], dtype=np.float64)
    delta = float(diffs.mean())
    control_sd = float(controls.std(ddof=1)) if len(seeds) > 1 else float("nan")
    better = "higher" if higher_is_better(metric) else "lower"
    if len(seeds) == 1:
        lower = upper = float("nan")
        method = "none"
    elif len(seeds) >= BOOTSTRAP_FROM:
        lower, upper = bootstrap_interval(diffs)
        method = "bootstrap"
    else:
        lower, upper = t_interval(diffs)
        method = "t"
    if method != "none" and (lower > 0 or upper < 0):
        improves = (delta > 0) == (better == "higher")
        verdict, needed = (HELPS if improves else HURTS), None
    else:
        verdict = NO_EFFECT
        needed = seeds_needed(delta, float(diffs.std(ddof=1)) if len(seeds) > 1 else float("nan"))
    return Comparison(delta=delta, lower=lower, upper=upper, seeds=len(seeds), method=method,
                      control_sd=control_sd, verdict=verdict, better=better, seeds_needed=needed)


def judge(results: list[dict], metrics: list[str], primary: str) -> dict:
    """From results rows ({"arm", "seed", metric: value}) to verdict.json's body: every
    candidate's comparison on every metric, and the candidates ranked on `primary`
    (best first: the largest improvement in the metric's better direction)."""
    if primary not in metrics:
        raise ConfigError(f"primary metric {primary!r} is not measured (metrics: {', '.join(metrics)})")
    by_arm: dict[str, dict[str, dict[int, float]]] = {}
    for row in results:
        for metric in metrics:
            value = row.get(metric)
            if value is not None and math.isfinite(value):
                by_arm.setdefault(row["arm"], {}).setdefault(metric, {})[int(row["seed"])] = float(value)
    if CONTROL not in by_arm:
        raise ConfigError("no control arm in the results: every comparison is against it")
    candidates = [arm for arm in dict.fromkeys(row["arm"] for row in results) if arm != CONTROL]
    out = {name: {metric: compare(by_arm[name][metric], by_arm[CONTROL][metric], metric).to_dict()
                  for metric in metrics if metric in by_arm.get(name, {}) and metric in by_arm[CONTROL]}
           for name in candidates}
    sign = 1.0 if higher_is_better(primary) else -1.0
    ranked = sorted((name for name in candidates if primary in out[name]),
                    key=lambda name: -sign * out[name][primary]["delta"])
    return {"primary": primary, "level": LEVEL, "candidates": out, "ranking": ranked}

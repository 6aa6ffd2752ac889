"""Proxy mixture design: which small runs to train before fitting a mixing law.

The natural distribution p_d = tokens_d / total_tokens comes from the tokenize
stage's availability.json (DESIGN.md contract 3). Proxy mixtures are drawn as
RegMix does: Dirichlet(alpha * p) with the concentration alpha log-uniform, so a
few runs sit close to p (large alpha) and others are sparse, near a corner (small
alpha); the response surface is then seen both where the big run will probably
land and far from it. The natural mixture itself is run 0, the baseline every
optimized mixture is compared with.

Token caps: a domain with tokens_d available can give at most tokens_d * max_epochs
tokens to a run of target_tokens, i.e. weight_d <= tokens_d * max_epochs / target_tokens.
A draw that breaks a cap (or the min_weight floor) is redrawn; only after
REDRAW_TRIES failures is it projected onto the feasible set. Redrawing keeps the
design distributed as the Dirichlet restricted to the feasible set; clipping every
draw would pile many runs on exactly the cap, wasting runs on one face of the
simplex. The projection is the fallback for caps so tight that feasible draws are
rare (it is the closest feasible point in Euclidean distance).

Default K = 3(m + 1) runs in all, the natural mixture included: Olmix's minimum for
m domains (a law with per-domain terms needs that many to be identified with
slack for cross-validation).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import polars as pl

from kiln.config import ConfigError
from kiln.formats.runs import WEIGHT_PREFIX
from kiln.formats.shards import Availability, load_availability

# RegMix's range for the Dirichlet concentration: 0.1 gives near-one-hot mixtures,
# 100 gives mixtures within a few percent of the natural one.
ALPHA_RANGE = (0.1, 100.0)
# Draws per run before falling back to projection; at 200 a cap that admits 1 % of
# the Dirichlet mass is still met by redraw with probability 0.87.
REDRAW_TRIES = 200


def weight_caps(avail: Availability, domains: list[str], target_tokens: int,
                max_epochs: float | None) -> np.ndarray:
    """Upper bound on each domain's weight: tokens_d * max_epochs / target_tokens, at
    most 1; a domain with no tokens gets 0 whatever max_epochs says (nothing to sample)."""
    if target_tokens <= 0:
        raise ConfigError(f"target tokens must be positive, got {target_tokens}")
    if max_epochs is not None and not max_epochs > 0:
        raise ConfigError(f"max epochs must be positive, got {max_epochs}")
    tokens = np.array([avail.tokens[d] for d in domains], dtype=np.float64)
    if max_epochs is None:
        return np.where(tokens > 0, 1.0, 0.0)
    return np.minimum(tokens * max_epochs / target_tokens, 1.0)


def check_caps(avail: Availability, domains: list[str], target_tokens: int,
               max_epochs: float | None, min_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) weight bounds, or a ConfigError saying why no mixture fits them."""
    upper = weight_caps(avail, domains, target_tokens, max_epochs)
    if upper.sum() < 1.0 - 1e-12:
        # Every domain is at its cap when the caps cannot reach 1, so all bind; the
        # ones that give least are named first as the cheapest to top up.
        allowed = float(np.sum(np.array([avail.tokens[d] for d in domains], dtype=np.float64) * max_epochs))
        missing = target_tokens - allowed
        order = np.argsort(upper)
        parts = ", ".join(f"{domains[i]} ({avail.tokens[domains[i]]} tokens x {max_epochs:g} epochs)"
                          for i in order)
        need = target_tokens / max(avail.total, 1)
        binding = "domain " + domains[order[0]] + " is the binding one" if len(domains) == 1 else \
            "every domain is at its cap, " + domains[order[0]] + " the tightest"
        raise ConfigError(
            f"{avail.describe()}: caps allow only {allowed:,.0f} of the {target_tokens:,} target tokens "
            f"({missing:,.0f} missing); {binding}: {parts}. Raise max epochs to at least {need:.4g} "
            "or lower the target tokens")
    if not 0.0 <= min_weight <= 1.0:
        raise ConfigError(f"min weight must be in [0, 1], got {min_weight}")
    lower = np.where(upper > 0, min_weight, 0.0)
    below = [d for d, lo, hi in zip(domains, lower, upper) if lo > hi]
    if below:
        raise ConfigError(f"{avail.describe()}: min weight {min_weight} exceeds the cap of domain(s) "
                          f"{', '.join(below)} (max weight {', '.join(f'{u:.4g}' for u in upper[lower > upper])} "
                          f"at {target_tokens:,} target tokens)")
    if lower.sum() > 1.0 + 1e-12:
        raise ConfigError(f"min weight {min_weight} x {int((lower > 0).sum())} domains = {lower.sum():.4g} > 1")
    return lower, upper


def project_box_simplex(v: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection of v (one row, or rows) onto {w : lower <= w <= upper,
    sum w = 1}: the point clip(v - tau, lower, upper) whose sum is 1, tau found by
    bisection (the sum falls monotonically in tau). Assumes sum(lower) <= 1 <= sum(upper)."""
    v = np.asarray(v, dtype=np.float64)
    rows = np.atleast_2d(v)
    lo_tau = np.min(rows - upper, axis=1, keepdims=True) - 1.0
    hi_tau = np.max(rows - lower, axis=1, keepdims=True) + 1.0
    for _ in range(100):  # 100 halvings take any starting span below float64 resolution
        tau = 0.5 * (lo_tau + hi_tau)
        over = np.clip(rows - tau, lower, upper).sum(axis=1, keepdims=True) > 1.0
        lo_tau = np.where(over, tau, lo_tau)
        hi_tau = np.where(over, hi_tau, tau)
    w = np.clip(rows - 0.5 * (lo_tau + hi_tau), lower, upper)
    # Spread the last rounding error over the free coordinates so each row sums to 1.
    free = (w > lower) & (w < upper)
    n_free = free.sum(axis=1, keepdims=True)
    w = w + np.where(free, (1.0 - w.sum(axis=1, keepdims=True)) / np.maximum(n_free, 1), 0.0)
    # That spread can push a weight within 1e-16 of a bound past it; bounds win.
    w = np.clip(w, lower, upper)
    return w if v.ndim == 2 else w[0]


def feasible(w: np.ndarray, lower: np.ndarray, upper: np.ndarray, tol: float = 1e-12) -> bool:
    return bool(np.all(w >= lower - tol) and np.all(w <= upper + tol))


def design(availability_path: str | os.PathLike | dict | Availability, k: int | None = None, *,
           target_tokens: int, max_epochs: float | None = None, seed: int = 0,
           min_weight: float = 0.0) -> pl.DataFrame:
    """The runs plan: K mixtures, run "p000" the natural one (moved to the closest
    feasible point if min_weight pushes it out), the rest Dirichlet(alpha * p) draws
    with log-uniform alpha. Columns: run, w_<domain>..., target_tokens, seed (the
    training seed, the same for every run so runs differ only in their data)."""
    avail = load_availability(availability_path)
    domains = avail.domains
    m = len(domains)
    k = 3 * (m + 1) if k is None else k
    if k < 1:
        raise ConfigError(f"number of proxy runs must be at least 1, got {k}")
    lower, upper = check_caps(avail, domains, target_tokens, max_epochs, min_weight)
    p = avail.natural(domains)
    # Domains without tokens stay at 0 and out of the Dirichlet (a 0 parameter is undefined).
    live = upper > 0
    rng = np.random.default_rng(seed)
    natural = p if feasible(p, lower, upper) else project_box_simplex(p, lower, upper)
    rows = [natural]
    log_lo, log_hi = math.log(ALPHA_RANGE[0]), math.log(ALPHA_RANGE[1])
    while len(rows) < k:
        alpha = math.exp(rng.uniform(log_lo, log_hi))
        w = None
        for _ in range(REDRAW_TRIES):
            draw = np.zeros(m)
            draw[live] = rng.dirichlet(alpha * p[live])
            # Very small parameters can underflow every gamma draw to 0 (a 0/0 row).
            if np.all(np.isfinite(draw)) and abs(draw.sum() - 1.0) < 1e-9 and feasible(draw, lower, upper):
                w = draw
                break
        if w is None:
            w = project_box_simplex(np.nan_to_num(draw, nan=0.0), lower, upper)
        rows.append(w)
    weights = np.vstack(rows)
    columns = {"run": [f"p{i:03d}" for i in range(k)]}
    columns.update({f"{WEIGHT_PREFIX}{d}": weights[:, j] for j, d in enumerate(domains)})
    columns["target_tokens"] = [int(target_tokens)] * k
    columns["seed"] = [int(seed)] * k
    return pl.DataFrame(columns, schema_overrides={"target_tokens": pl.Int64, "seed": pl.Int64})


def write_plan(df: pl.DataFrame, path: str | os.PathLike) -> None:
    """The plan as CSV (Parquet if the name ends in .parquet); float weights are
    written at full precision so the runs train on exactly these mixtures."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".parquet":
        df.write_parquet(target)
    else:
        df.write_csv(target)

"""Two mixing studies from continual-pretraining practice.

ALMR ("A Practice of Post-Training on Llama-3 70B with Optimal Selection of
Additional Language Mixture Ratio"): the ratio r of an extra language (or domain)
and the learning rate eta are chosen jointly, because the best eta moves with r.
Runs on an r x eta grid are fitted by

    L(r, x) = c(r) + q * (x - x*(r))^2,   x = log eta,  x*(r) = a + b r,  c quadratic in r

i.e. a parabola in log eta whose vertex moves linearly with the ratio. Expanded, that
is exactly the full quadratic in (r, x) without the r^2 x, r x^2 terms:

    L = b0 + b1 r + b2 r^2 + b3 x + b4 r x + b5 x^2

so ordinary least squares fits it and q = b5, a = -b3 / (2 q), b = -b4 / (2 q); the
best learning rate for a ratio is eta*(r) = exp(a + b r). Substituting x*(r) gives
the profile c(r), a quadratic whose minimum over the grid's range of r is the best
pair.

CMR (critical mixture ratio): for each training-token budget D, the largest ratio
r of a domain for which the general-domain loss stays within `tolerance` of its
r = 0 baseline. Per budget, loss is interpolated linearly between the grid's ratios
and r_crit(D) is the first upward crossing of baseline + tolerance (the largest r
with every smaller ratio also within tolerance). The law r_crit(D) = A * D^s is fitted
by least squares in log-log; the sign of s is fitted, not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import polars as pl

from kiln.config import ConfigError


def _numeric(table: pl.DataFrame, columns: list[str], what: str) -> tuple[pl.DataFrame, int]:
    """The rows with every column finite; a missing column is an error naming it."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"{what}: column(s) {', '.join(missing)} not in the table "
                          f"(columns: {', '.join(table.columns)})")
    sub = table.select([pl.col(c).cast(pl.Float64, strict=False) for c in columns])
    keep = np.all(np.isfinite(sub.to_numpy().astype(np.float64)), axis=1)
    return sub.filter(pl.Series(keep)), int((~keep).sum())


# ---------------------------------------------------------------------------- ALMR

def almr_grid(ratios: list[float], lrs: list[float]) -> pl.DataFrame:
    """The runs plan: every (ratio, lr) pair, ratio-major, with a run id."""
    if len(set(ratios)) < 3 or len(set(lrs)) < 3:
        raise ConfigError(f"ALMR needs at least 3 distinct ratios and 3 distinct learning rates "
                          f"(a quadratic in each); got {len(set(ratios))} and {len(set(lrs))}")
    if any(not 0 <= r <= 1 for r in ratios):
        raise ConfigError(f"ratios must be in [0, 1], got {ratios}")
    if any(not lr > 0 for lr in lrs):
        raise ConfigError(f"learning rates must be positive, got {lrs}")
    pairs = list(product(sorted(set(ratios)), sorted(set(lrs))))
    return pl.DataFrame({"run": [f"almr{i:03d}" for i in range(len(pairs))],
                         "ratio": [float(r) for r, _ in pairs], "lr": [float(lr) for _, lr in pairs]})


@dataclass
class AlmrFit:
    coef: np.ndarray  # b0..b5 of L = b0 + b1 r + b2 r^2 + b3 x + b4 r x + b5 x^2, x = ln lr
    a: float  # ln lr*(r) = a + b r
    b: float
    q: float  # curvature in ln lr (> 0: a minimum)
    best_ratio: float  # argmin of the profile over the grid's ratio range
    best_lr: float
    best_loss: float  # fitted loss at the best pair
    rmse: float  # residual root mean square on the runs
    r2: float
    n_runs: int
    dropped: int  # rows dropped for a missing / non-finite value
    ratio_range: tuple[float, float]
    curve: pl.DataFrame = field(default_factory=pl.DataFrame)  # per grid ratio: best lr, fitted loss there

    def lr_star(self, ratio: float | np.ndarray) -> np.ndarray:
        """Best learning rate at `ratio` (extrapolation outside the grid is the caller's risk)."""
        return np.exp(self.a + self.b * np.asarray(ratio, dtype=np.float64))

    def loss(self, ratio: float | np.ndarray, lr: float | np.ndarray) -> np.ndarray:
        return _almr_features(np.asarray(ratio, dtype=np.float64), np.log(np.asarray(lr, dtype=np.float64))) @ self.coef

    def profile(self, ratio: float | np.ndarray) -> np.ndarray:
        """Fitted loss at each ratio with its best learning rate."""
        return self.loss(ratio, self.lr_star(ratio))


def _almr_features(r: np.ndarray, x: np.ndarray) -> np.ndarray:
    r, x = np.broadcast_arrays(np.atleast_1d(r), np.atleast_1d(x))
    return np.stack([np.ones_like(r), r, r * r, x, r * x, x * x], axis=-1)


def almr_fit(table: pl.DataFrame, ratio_col: str = "ratio", lr_col: str = "lr",
             target_col: str = "loss") -> AlmrFit:
    rows, dropped = _numeric(table, [ratio_col, lr_col, target_col], "ALMR")
    r, lr, y = (rows[c].to_numpy() for c in (ratio_col, lr_col, target_col))
    if np.any(lr <= 0):
        raise ConfigError(f"ALMR: column {lr_col} has non-positive learning rates")
    n_r, n_lr = len(np.unique(r)), len(np.unique(lr))
    if n_r < 3 or n_lr < 3:
        raise ConfigError(f"ALMR: need runs at >= 3 distinct ratios and >= 3 distinct learning rates; "
                          f"got {n_r} ratios and {n_lr} learning rates ({dropped} rows dropped for missing values)")
    if np.ptp(y) == 0:
        raise ConfigError(f"ALMR: column {target_col} is constant ({y[0]}); nothing to fit")
    x = np.log(lr)
    X = _almr_features(r, x)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    q = float(coef[5])
    if not q > 0:
        raise ConfigError(f"ALMR: the fitted loss has no minimum in the learning rate (curvature {q:.3g} in ln lr); "
                          "widen the learning-rate grid so it brackets the best rate")
    a, b = -coef[3] / (2 * q), -coef[4] / (2 * q)
    resid = y - X @ coef
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    lo, hi = float(r.min()), float(r.max())
    fit = AlmrFit(coef=coef, a=float(a), b=float(b), q=q, best_ratio=lo, best_lr=0.0, best_loss=0.0,
                  rmse=float(np.sqrt(np.mean(resid ** 2))), r2=1.0 - float(np.sum(resid ** 2)) / ss_tot,
                  n_runs=len(y), dropped=dropped, ratio_range=(lo, hi))
    # The profile c(r) is a quadratic in r: its vertex if that is a minimum inside
    # the grid, else the better end of the range.
    c2 = coef[2] - q * b * b
    c1 = coef[1] - 2 * q * a * b
    options = [lo, hi]
    if c2 > 0:
        options.append(min(max(-c1 / (2 * c2), lo), hi))
    values = [float(fit.profile(v)[0]) for v in options]
    best = options[int(np.argmin(values))]
    fit.best_ratio, fit.best_lr, fit.best_loss = float(best), float(fit.lr_star(best)), float(min(values))
    grid_r = np.unique(r)
    fit.curve = pl.DataFrame({"ratio": grid_r, "best_lr": fit.lr_star(grid_r), "fitted_loss": fit.profile(grid_r)})
    return fit


# ----------------------------------------------------------------------------- CMR

@dataclass
class CmrFit:
    A: float  # r_crit(D) = A * D ** exponent
    exponent: float  # fitted sign and size; negative: larger budgets tolerate less of the domain
    r2: float  # of the log-log fit over the uncensored budgets
    tolerance: float
    relative: bool  # tolerance as a fraction of the baseline loss instead of nats
    budgets: pl.DataFrame  # tokens, baseline, r_crit, censored (never crossed within the grid)

    def predict(self, tokens: float | np.ndarray) -> np.ndarray:
        return self.A * np.power(np.asarray(tokens, dtype=np.float64), self.exponent)


def critical_ratio(ratios: np.ndarray, losses: np.ndarray, threshold: float) -> tuple[float, bool]:
    """First upward crossing of `threshold` by loss(r), linearly interpolated; (r_max,
    True) if the loss stays within it over the whole grid (censored)."""
    order = np.argsort(ratios)
    r, y = ratios[order], losses[order]
    excess = y - threshold
    for i in range(1, len(r)):
        if excess[i] > 0:
            if excess[i - 1] > 0:  # already over at the previous point: crossed before it
                return float(r[i - 1]), False
            t = -excess[i - 1] / (excess[i] - excess[i - 1])
            return float(r[i - 1] + t * (r[i] - r[i - 1])), False
    return float(r[-1]), True


def cmr_fit(table: pl.DataFrame, ratio_col: str = "ratio", tokens_col: str = "tokens",
            loss_col: str = "loss", tolerance: float = 0.01, relative: bool = False) -> CmrFit:
    if not tolerance > 0:
        raise ConfigError(f"CMR: tolerance must be positive, got {tolerance}")
    rows, dropped = _numeric(table, [ratio_col, tokens_col, loss_col], "CMR")
    records = []
    for (tokens,), group in rows.group_by([tokens_col], maintain_order=True):
        r, y = group[ratio_col].to_numpy(), group[loss_col].to_numpy()
        base = y[r == 0]
        if len(base) == 0:
            raise ConfigError(f"CMR: no baseline run (ratio 0) at {tokens_col} = {tokens:g}")
        if len(np.unique(r)) < 2:
            raise ConfigError(f"CMR: only ratio 0 was run at {tokens_col} = {tokens:g}")
        baseline = float(base.mean())  # several seeds at r = 0 average into one baseline
        # Duplicate ratios (seeds) average too, so the interpolation sees one curve.
        ur = np.unique(r)
        uy = np.array([y[r == v].mean() for v in ur])
        threshold = baseline * (1 + tolerance) if relative else baseline + tolerance
        rc, censored = critical_ratio(ur, uy, threshold)
        records.append({"tokens": float(tokens), "baseline": baseline, "r_crit": rc, "censored": censored})
    budgets = pl.DataFrame(records).sort("tokens")
    usable = budgets.filter(~pl.col("censored") & (pl.col("r_crit") > 0) & (pl.col("tokens") > 0))
    if usable.height < 2:
        raise ConfigError(f"CMR: need a critical ratio at >= 2 token budgets to fit the power law; "
                          f"{usable.height} of {budgets.height} budgets cross the tolerance within the grid "
                          f"({dropped} rows dropped for missing values); add larger ratios or budgets")
    logd, logr = np.log(usable["tokens"].to_numpy()), np.log(usable["r_crit"].to_numpy())
    X = np.stack([np.ones_like(logd), logd], axis=1)
    (log_a, s), *_ = np.linalg.lstsq(X, logr, rcond=None)
    resid = logr - X @ np.array([log_a, s])
    ss_tot = float(np.sum((logr - logr.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 1.0
    return CmrFit(A=float(math.exp(log_a)), exponent=float(s), r2=r2, tolerance=tolerance,
                  relative=relative, budgets=budgets)

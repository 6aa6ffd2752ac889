"""Fit a target (a validation loss) as a function of mixture weights, with intervals.

Three methods, each a small class with `minimum(m)`, `fit(W, y, rng)` -> parameters
(plain JSON) and `predict(params, W)`:

- `law`: the Data Mixing Law (Ye et al. 2024), L(r) = c + k·exp(Σ_j t_j r_j), fitted
  with a Huber loss and multi-start L-BFGS-B like the paper. Because Σ_j r_j = 1,
  adding a to every t_j is the same law as multiplying k by e^a; the fit reports the
  one representative with Σ_j t_j = 0, so parameters are comparable between fits.
- `linear`: least squares of y on the m weights. No intercept: with Σ_j r_j = 1 an
  intercept is a constant already spanned by the weight columns.
- `gbm`: LightGBM regression trees on the weights, as RegMix.

A target made of several columns (`a:0.5,b:0.5`) is fitted column by column and the
fits are added with the weights: a sum of laws (one per validation domain, as the
Data Mixing Laws paper predicts a mixed validation loss) can have its optimum inside
the simplex, a single exponential law never does.

k-fold cross-validation gives Spearman ρ and MAE of out-of-fold predictions; `auto`
picks the method with the best ρ (ties: lower MAE). Bootstrap refits on resampled
runs (default 50) give intervals: `Fit.predict` returns the fit on all runs as the
mean and the ensemble's quantiles as lower/upper, an interval for the expected
target at each mixture (the run-to-run noise of one new run is not added).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy.optimize import minimize
from scipy.stats import spearmanr
from threadpoolctl import threadpool_limits

from kiln.config import ConfigError
from kiln.formats.runs import SUM_TOLERANCE
from kiln.mixing.table import (Runs, glob_affixes, match_weight_columns, numeric_column,
                               read_table, say)

FORMAT = "kiln-fit-v1"
METHODS = ("law", "linear", "gbm")


def _one_thread(func):
    """Run `func` with BLAS on one thread. The law's L-BFGS-B works on (n, m) arrays of
    tens of rows; with a multi-threaded BLAS every tiny product wakes the thread pool,
    and on a busy 2-core machine one fit went from 35 ms to 1.7 s."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1):
            return func(*args, **kwargs)
    return wrapper


@dataclass
class LawConfig:
    huber_delta: float = 1e-3  # Huber delta relative to the target's scale (median |y|), as Ye et al.
    n_starts: int = 16  # L-BFGS-B starts for the fit on all runs; the best final loss is kept
    boot_starts: int = 4  # starts per bootstrap refit: the full fit's optimum plus random ones
    max_exponent: float = 50.0  # bound on |t_j| and |log k| (standardized units): exp stays finite


@dataclass
class GbmConfig:
    num_leaves: int = 8  # small trees: proxy tables have tens of rows, not thousands
    min_data_in_leaf: int = 2  # allows splits on tiny tables (LightGBM's default 20 would allow none)
    learning_rate: float = 0.05  # RegMix-like shrinkage
    n_estimators: int = 300  # boosting rounds


@dataclass
class FitConfig:
    n_boot: int = 50  # bootstrap refits for the intervals; 0 gives lower = upper = mean
    cv_folds: int = 5  # k of k-fold cross-validation
    seed: int = 0  # seeds folds, bootstrap resamples, law starts and LightGBM
    law: LawConfig = field(default_factory=LawConfig)  # law fitting options
    gbm: GbmConfig = field(default_factory=GbmConfig)  # LightGBM options


# ---------------------------------------------------------------- the three methods

class LawMethod:
    name = "law"
    rule = "m + 2: the law has m + 2 parameters c, k, t_1..t_m, one of them redundant, plus one to spare"

    def __init__(self, cfg: LawConfig):
        self.cfg = cfg

    @staticmethod
    def minimum(m: int) -> int:
        return m + 2

    def fit(self, W: np.ndarray, y: np.ndarray, rng: np.random.Generator, init: dict | None = None) -> dict:
        n, m = W.shape
        # Standardized target: the law is closed under y -> (y - mu)/sd (c and k rescale,
        # t does not), and L-BFGS-B's tolerances then mean the same for every loss scale.
        mu, sd = float(y.mean()), float(y.std())
        z = (y - mu) / sd
        delta = self.cfg.huber_delta * max(float(np.median(np.abs(y))), 1e-12) / sd
        bound = self.cfg.max_exponent

        def objective(theta):
            c, logk, t = theta[0], theta[1], theta[2:]
            e = np.exp(np.clip(logk + W @ t, -bound * 2, bound * 2))  # (n,)
            r = c + e - z
            a = np.abs(r)
            # Divided by delta: the loss is ~|r| for outliers and its gradient lies in [-1, 1].
            loss = np.where(a <= delta, 0.5 * r * r / delta, a - 0.5 * delta).sum() / n
            psi = np.clip(r / delta, -1.0, 1.0) / n  # (n,) dloss/dr
            pe = psi * e
            return loss, np.concatenate([[psi.sum(), pe.sum()], W.T @ pe])

        starts = []
        if init is not None:
            starts.append(self._standardize(init, mu, sd))
        n_random = self.cfg.n_starts if init is None else self.cfg.boot_starts - 1
        scales = (0.5, 1.0, 2.0, 4.0)  # exponent spreads from nearly linear to strongly curved
        for s in range(n_random):
            starts.append(self._start(W, z, rng.normal(0.0, scales[s % len(scales)], m)))
        bounds = [(None, None)] + [(-bound, bound)] * (m + 1)
        best = None
        for theta0 in starts:
            res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10})
            if best is None or res.fun < best.fun:
                best = res
        c, logk, t = best.x[0], best.x[1], best.x[2:].copy()
        shift = t.mean()  # the representative with Σ t_j = 0 (module doc)
        t -= shift
        logk += shift
        return {"c": mu + sd * float(c), "log_k": float(logk + math.log(sd)), "t": t.tolist()}

    @staticmethod
    def _standardize(p: dict, mu: float, sd: float) -> np.ndarray:
        return np.concatenate([[(p["c"] - mu) / sd, p["log_k"] - math.log(sd)], p["t"]])

    @staticmethod
    def _start(W: np.ndarray, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Given exponents t, c and k enter linearly: solve them by least squares."""
        t = t - t.mean()
        e = np.exp(W @ t)
        A = np.column_stack([np.ones_like(e), e])
        (c, k), *_ = np.linalg.lstsq(A, z, rcond=None)
        if not (k > 1e-6 and np.isfinite(k)):
            k = 1.0
            c = float(z.mean() - e.mean())
        return np.concatenate([[c, math.log(k)], t])

    @staticmethod
    def predict(p: dict, W: np.ndarray) -> np.ndarray:
        return p["c"] + np.exp(p["log_k"] + W @ np.asarray(p["t"]))


class LinearMethod:
    name = "linear"
    rule = "m + 1: m coefficients plus one to spare"

    def __init__(self, cfg=None):
        pass

    @staticmethod
    def minimum(m: int) -> int:
        return m + 1

    def fit(self, W, y, rng, init=None) -> dict:
        coef, *_ = np.linalg.lstsq(W, y, rcond=None)  # minimum-norm if a domain is never varied
        return {"coef": coef.tolist()}

    @staticmethod
    def predict(p: dict, W: np.ndarray) -> np.ndarray:
        return W @ np.asarray(p["coef"])


class GbmMethod:
    name = "gbm"
    rule = "3(m + 1), the Olmix guidance for regression mixers"

    def __init__(self, cfg: GbmConfig):
        self.cfg = cfg
        self._cache: dict[str, object] = {}  # model string -> Booster, parsed once per process

    @staticmethod
    def minimum(m: int) -> int:
        return 3 * (m + 1)

    def fit(self, W, y, rng, init=None) -> dict:
        import lightgbm as lgb

        params = {"objective": "regression", "num_leaves": self.cfg.num_leaves,
                  "min_data_in_leaf": self.cfg.min_data_in_leaf, "min_data_in_bin": 1,
                  "learning_rate": self.cfg.learning_rate, "seed": int(rng.integers(2**31)),
                  "deterministic": True, "num_threads": 1, "verbose": -1, "force_row_wise": True}
        data = lgb.Dataset(W, label=y, params={"min_data_in_bin": 1, "verbose": -1})
        booster = lgb.train(params, data, num_boost_round=self.cfg.n_estimators)
        text = booster.model_to_string()
        self._cache[text] = booster
        return {"model": text}

    def predict(self, p: dict, W: np.ndarray) -> np.ndarray:
        import lightgbm as lgb

        booster = self._cache.get(p["model"])
        if booster is None:
            booster = self._cache[p["model"]] = lgb.Booster(model_str=p["model"])
        return np.asarray(booster.predict(W, num_threads=1))


def method_class(name: str, config: FitConfig):
    if name == "law":
        return LawMethod(config.law)
    if name == "linear":
        return LinearMethod()
    if name == "gbm":
        return GbmMethod(config.gbm)
    raise ConfigError(f"unknown fit method {name!r} (known: auto, {', '.join(METHODS)})")


def check_minimum(method, runs: Runs) -> None:
    need = method.minimum(runs.m)
    if runs.n < need:
        raise ConfigError(f"{runs.path or 'runs'}: method {method.name} needs at least {need} runs for "
                          f"{runs.m} domains ({method.rule}); the table has {runs.n}")


# ---------------------------------------------------------------- one member = one fit per target column

def _fit_member(method, runs: Runs, idx: np.ndarray, rng, init: list | None = None) -> list[dict]:
    return [method.fit(runs.W[idx], runs.Y[idx, k], rng, None if init is None else init[k])
            for k in range(runs.Y.shape[1])]


def _predict_member(method, member: list[dict], coefs: list[float], W: np.ndarray) -> np.ndarray:
    return sum(c * method.predict(p, W) for c, p in zip(coefs, member))


# ---------------------------------------------------------------- cross-validation

@dataclass
class CVResult:
    method: str  # method cross-validated
    spearman: float  # Spearman ρ of out-of-fold predictions against the target (NaN if undefined)
    mae: float  # mean absolute error of out-of-fold predictions
    folds: int  # folds used (n for leave-one-out)
    n: int  # runs
    predicted: list = dataclasses.field(default_factory=list)  # out-of-fold prediction of each run, in run order
    actual: list = dataclasses.field(default_factory=list)  # the runs' target, same order


def cv_folds(n: int, minimum: int, k: int) -> int:
    """k, or leave-one-out when k-fold training folds would fall below the method's
    minimum; 0 when even leave-one-out cannot train the method."""
    k = min(k, n)
    if n - math.ceil(n / k) >= minimum:
        return k
    return n if n - 1 >= minimum else 0


@_one_thread
def cross_validate(runs: Runs, method: str, k: int = 5, seed: int = 0,
                   config: FitConfig | None = None) -> CVResult:
    config = config or FitConfig()
    meth = method_class(method, config)
    check_minimum(meth, runs)
    folds = cv_folds(runs.n, meth.minimum(runs.m), k)
    if folds == 0:
        raise ConfigError(f"{runs.path or 'runs'}: {runs.n} runs are too few to cross-validate {method} "
                          f"(a training fold needs {meth.minimum(runs.m)})")
    rng = np.random.default_rng(seed)
    order = rng.permutation(runs.n)
    pred = np.empty(runs.n)
    for test in np.array_split(order, folds):
        train = np.setdiff1d(order, test)
        member = _fit_member(meth, runs, train, rng)
        pred[test] = _predict_member(meth, member, runs.target.coefs, runs.W[test])
    y = runs.y
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant predictions: ρ is undefined, reported as NaN
        rho = float(spearmanr(pred, y).statistic)
    return CVResult(method, rho, float(np.mean(np.abs(pred - y))), folds, runs.n, pred.tolist(), y.tolist())


def cv_table(results: dict[str, CVResult | str], chosen: str | None) -> str:
    lines = [f"{'method':<8} {'folds':>5} {'spearman':>9} {'MAE':>10}"]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"{name:<8} {r}")
        else:
            mark = "  <- chosen" if name == chosen else ""
            lines.append(f"{name:<8} {r.folds:>5} {r.spearman:>9.4f} {r.mae:>10.5g}{mark}")
    return "\n".join(lines)


def _rank_key(r: CVResult):
    return (-(r.spearman if np.isfinite(r.spearman) else -np.inf), r.mae)


# ---------------------------------------------------------------- the fit

@dataclass
class Prediction:
    mean: np.ndarray  # (n,) the fit on all runs
    lower: np.ndarray  # (n,) bootstrap quantile (1 - level)/2
    upper: np.ndarray  # (n,) bootstrap quantile (1 + level)/2


class Fit:
    """A fitted model of a target as a function of mixture weights (see the module doc)."""

    def __init__(self, method: str, domains: list[str], target: str, target_columns: list[str],
                 target_coefs: list[float], point: list[dict], members: list[list[dict]],
                 cv: dict | None = None, info: dict | None = None, config: FitConfig | None = None):
        self.method = method
        self.domains = list(domains)
        self.target = target
        self.target_columns = list(target_columns)
        self.target_coefs = [float(c) for c in target_coefs]
        self.point = point  # per target column, the parameters fitted on all runs
        self.members = members  # bootstrap refits, each a list like `point`
        self.cv = cv or {}  # method -> {"spearman", "mae", "folds", "n"} (or a reason string)
        self.info = info or {}  # provenance: runs file, n, dropped, renormalized, weights glob, scaling
        self._method = method_class(method, config or FitConfig())

    def predict(self, weights: np.ndarray, level: float = 0.9) -> Prediction:
        W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if W.ndim != 2 or W.shape[1] != len(self.domains):
            raise ValueError(f"weights of shape {W.shape}: expected (n, {len(self.domains)}) "
                             f"for domains {self.domains}")
        if not 0 < level < 1:
            raise ValueError(f"level {level} is not in (0, 1)")
        mean = _predict_member(self._method, self.point, self.target_coefs, W)
        if not self.members:
            return Prediction(mean, mean.copy(), mean.copy())
        ens = np.stack([_predict_member(self._method, mem, self.target_coefs, W) for mem in self.members])
        lower, upper = np.quantile(ens, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return Prediction(mean, lower, upper)

    def parameters(self) -> list[dict]:
        """The point fit's parameters per target column; for the law with k spelled out."""
        if self.method != "law":
            return self.point
        return [{"c": p["c"], "k": math.exp(p["log_k"]), **p} for p in self.point]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "domains": self.domains, "target": self.target,
                "target_columns": self.target_columns, "target_coefs": self.target_coefs,
                "parameters": self.parameters(), "bootstrap": self.members, "cv": self.cv,
                **self.info}

    def save(self, path: str | os.PathLike) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fit":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such fit file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a JSON fit file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a {FORMAT} fit file (format {data.get('format') if isinstance(data, dict) else None!r})")
        if data.get("method") not in METHODS:
            raise ConfigError(f"{path}: unknown method {data.get('method')!r}")
        keys = {"format", "method", "domains", "target", "target_columns", "target_coefs",
                "parameters", "bootstrap", "cv"}
        point = [{k: v for k, v in p.items() if k != "k"} for p in data["parameters"]]
        return cls(data["method"], data["domains"], data["target"], data["target_columns"],
                   data["target_coefs"], point, data["bootstrap"], data["cv"],
                   {k: v for k, v in data.items() if k not in keys})


def _bootstrap(meth, runs: Runs, point: list[dict], n_boot: int, rng) -> list[list[dict]]:
    members = []
    attempts = 0
    while len(members) < n_boot:
        attempts += 1
        if attempts > 4 * n_boot + 10:
            say(f"only {len(members)} of {n_boot} bootstrap resamples could be fitted")
            break
        idx = rng.integers(0, runs.n, runs.n)
        # A resample with a constant target column has nothing to fit: draw another.
        if any(np.ptp(runs.Y[idx, k]) == 0 for k in range(runs.Y.shape[1])):
            continue
        members.append(_fit_member(meth, runs, idx, rng, init=point if meth.name == "law" else None))
    return members


def _info(runs: Runs) -> dict:
    return {"runs": runs.path, "n_runs": runs.n, "dropped": runs.dropped,
            "dropped_by_reason": runs.dropped_by_reason, "renormalized": runs.renormalized,
            "weights_glob": runs.weights_glob, "weight_columns": runs.weight_columns}


@_one_thread
def fit(runs: Runs, method: str = "auto", n_boot: int = 50, seed: int = 0,
        config: FitConfig | None = None, verbose: bool = True) -> Fit:
    """Cross-validate (every eligible method for `auto`), fit on all runs, bootstrap."""
    config = dataclasses.replace(config or FitConfig(), n_boot=n_boot, seed=seed)
    where = runs.path or "runs"
    names = METHODS if method == "auto" else (method,)
    results: dict[str, CVResult | str] = {}
    for name in names:
        meth = method_class(name, config)
        if method != "auto":
            check_minimum(meth, runs)
        elif runs.n < meth.minimum(runs.m):
            results[name] = f"skipped: needs at least {meth.minimum(runs.m)} runs ({meth.rule})"
            continue
        try:
            results[name] = cross_validate(runs, name, config.cv_folds, seed, config)
        except ConfigError as e:
            results[name] = f"no cross-validation: {e}"
    scored = {k: r for k, r in results.items() if isinstance(r, CVResult)}
    if method == "auto":
        if not scored:
            need = min(method_class(n, config).minimum(runs.m) for n in METHODS)
            raise ConfigError(f"{where}: {runs.n} runs for {runs.m} domains are too few to fit and "
                              f"cross-validate any method (law needs {need + 1} with leave-one-out)")
        chosen = min(scored, key=lambda k: _rank_key(scored[k]))
    else:
        chosen = method
    if verbose:
        say(f"{where}: {runs.n} runs, {runs.m} domains, target {runs.target.name}; "
            f"{config.cv_folds}-fold cross-validation:\n" + cv_table(results, chosen))
    meth = method_class(chosen, config)
    rng = np.random.default_rng(seed)
    all_rows = np.arange(runs.n)
    point = _fit_member(meth, runs, all_rows, rng)
    members = _bootstrap(meth, runs, point, n_boot, rng)
    cv = {k: (dataclasses.asdict(r) if isinstance(r, CVResult) else r) for k, r in results.items()}
    return Fit(chosen, runs.domains, runs.target.name, runs.target.columns, runs.target.coefs,
               point, members, cv, _info(runs), config)


# ---------------------------------------------------------------- predict a table of mixtures

def mixture_matrix(df: pl.DataFrame, fit: Fit, where: str, weights_glob: str | None = None) -> np.ndarray:
    """(n, m) weights in the fit's domain order, from exact domain-name columns or the
    fit's weight glob; rows are renormalized (and said) like a runs table."""
    if all(d in df.columns for d in fit.domains):
        cols = list(fit.domains)
    else:
        glob = weights_glob or fit.info.get("weights_glob") or ""
        if not glob:
            raise ConfigError(f"{where}: no column for domains "
                              f"{[d for d in fit.domains if d not in df.columns]} (columns: {', '.join(df.columns)})")
        matched, domains = match_weight_columns(df.columns, glob, where)
        by_domain = dict(zip(domains, matched))
        missing = [d for d in fit.domains if d not in by_domain]
        if missing:
            prefix, suffix = glob_affixes(glob)
            raise ConfigError(f"{where}: no weight column for domain(s) {missing} "
                              f"(expected e.g. {prefix + missing[0] + suffix!r} or {missing[0]!r}; "
                              f"columns: {', '.join(df.columns)})")
        extra = [d for d in domains if d not in fit.domains]
        if extra:
            raise ConfigError(f"{where}: weight column(s) for domain(s) {extra} the fit does not know "
                              f"(fit domains: {fit.domains})")
        cols = [by_domain[d] for d in fit.domains]
    W = np.column_stack([numeric_column(df, c, where) for c in cols])
    bad = np.flatnonzero(~np.isfinite(W).all(axis=1) | (W < 0).any(axis=1) | (W.sum(axis=1) <= 0))
    if len(bad):
        raise ConfigError(f"{where}: data row {bad[0] + 1} (counting from 1) has a missing, infinite, "
                          f"negative or all-zero weight: {dict(zip(cols, W[bad[0]].tolist()))}")
    sums = W.sum(axis=1)
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if off.any():
        say(f"{where}: renormalized the weights of {int(off.sum())} of {len(W)} mixtures to sum to 1")
        W = W / sums[:, None]
    return W


def predict_table(fit: Fit, mixtures_csv: str | os.PathLike, out_csv: str | os.PathLike,
                  level: float = 0.9, weights_glob: str | None = None) -> pl.DataFrame:
    """The mixtures table's rows, in order, plus `predicted`, `lower`, `upper`; written
    to `out_csv` (Parquet if it ends in .parquet) and returned."""
    df = read_table(mixtures_csv)
    W = mixture_matrix(df, fit, str(mixtures_csv), weights_glob)
    pred = fit.predict(W, level)
    out = df.with_columns(pl.Series("predicted", pred.mean), pl.Series("lower", pred.lower),
                          pl.Series("upper", pred.upper))
    path = Path(out_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".pq"):
        out.write_parquet(path)
    else:
        out.write_csv(path)
    return out


# ---------------------------------------------------------------- scale mode

@_one_thread
def fit_scaling(runs_by_scale: dict[float, Runs], target_scale: float, n_boot: int = 50, seed: int = 0,
                config: FitConfig | None = None, verbose: bool = True) -> Fit:
    """The law at `target_scale` (model size or training tokens), from law fits at
    several proxy scales.

    At each scale s the law is fitted per target column (with its bootstrap). Every
    parameter p of the law (c, log k, each t_j, in the Σt = 0 representative) is then
    taken as linear in log s, p(s) = a + b·log s, by least squares over the scales,
    and read at the target scale; each bootstrap member is carried through the same
    trend (member b at every scale), which gives the intervals. What this assumes: the
    parameters move log-linearly over the range (a power law c(s) = c∞ + A·s^-α is
    close to log-linear over a decade or two, but not forever: `info["scaling"]`
    records how far the target lies beyond the largest proxy). Two scales are the
    minimum (the line is then exact); three or more give a least-squares trend.
    """
    config = dataclasses.replace(config or FitConfig(), n_boot=n_boot, seed=seed)
    scales = sorted(runs_by_scale)
    if len(scales) < 2:
        raise ConfigError(f"scale mode needs runs at 2 or more scales, got {len(scales)}: {scales}")
    if any(s <= 0 for s in scales) or target_scale <= 0:
        raise ConfigError(f"scales must be positive (log-linear trends): {scales}, target {target_scale}")
    first = runs_by_scale[scales[0]]
    for s in scales[1:]:
        r = runs_by_scale[s]
        if r.domains != first.domains or r.target != first.target:
            raise ConfigError(f"scale {s:g}: domains {r.domains} / target {r.target.name} differ from "
                              f"scale {scales[0]:g}'s {first.domains} / {first.target.name}")
    meth = LawMethod(config.law)
    rng = np.random.default_rng(seed)
    per_scale = {}
    for s in scales:
        runs = runs_by_scale[s]
        check_minimum(meth, runs)
        point = _fit_member(meth, runs, np.arange(runs.n), rng)
        per_scale[s] = (point, _bootstrap(meth, runs, point, n_boot, rng))
    x = np.log(np.asarray(scales))
    A = np.column_stack([np.ones_like(x), x])  # (S, 2)

    def vec(p):
        return np.concatenate([[p["c"], p["log_k"]], p["t"]])

    def extrapolate(members_by_scale: list[list[dict]]) -> tuple[list[dict], list[list[float]]]:
        out, trends = [], []
        for k in range(len(first.target.columns)):
            P = np.stack([vec(mem[k]) for mem in members_by_scale])  # (S, m + 2)
            coef, *_ = np.linalg.lstsq(A, P, rcond=None)  # (2, m + 2): intercept, slope per parameter
            v = coef[0] + coef[1] * math.log(target_scale)
            t = v[2:] - v[2:].mean()  # trends of Σt = 0 parameters keep Σt = 0 up to rounding
            out.append({"c": float(v[0]), "log_k": float(v[1] + v[2:].mean()), "t": t.tolist()})
            trends.append(coef.T.tolist())
        return out, trends

    point, trends = extrapolate([per_scale[s][0] for s in scales])
    n_members = min(len(per_scale[s][1]) for s in scales)
    members = [extrapolate([per_scale[s][1][b] for s in scales])[0] for b in range(n_members)]
    info = _info(first)
    info["n_runs"] = sum(r.n for r in runs_by_scale.values())
    info["scaling"] = {
        "scales": scales, "target_scale": target_scale,
        "extrapolation": target_scale / scales[-1],  # > 1: beyond the largest proxy
        "trend": "each law parameter linear in log(scale): [intercept, slope] per parameter "
                 "in the order c, log_k, t_1..t_m",
        "coefficients": trends,
        "per_scale": {f"{s:g}": per_scale[s][0] for s in scales}}
    if verbose:
        say(f"scale mode: law fitted at scales {', '.join(f'{s:g}' for s in scales)}; "
            f"extrapolated to {target_scale:g} ({target_scale / scales[-1]:.3g}x the largest proxy)")
    return Fit("law", first.domains, first.target.name, first.target.columns, first.target.coefs,
               point, members, {}, info, config)

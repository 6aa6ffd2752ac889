"""Choose the mixture: minimize a fitted target over the simplex under token caps.

    minimize  fit(w).mean + kl_weight * KL(w || p)
    subject to  sum_d w_d = 1,  0 <= w_d <= tokens_d * max_epochs / target_tokens

p is the natural distribution from availability.json; the KL term pulls the answer
back toward it, for users who trust the fit less far from the data it was fitted on
(the proxies were drawn around p).

Search, in two stages:
1. A large candidate set (CANDIDATES Dirichlet draws around p with log-uniform
   concentration, as the design draws them, plus uniform-simplex draws and p itself),
   projected onto the feasible set and scored in one batched predict call. This is
   the whole search for a gradient-boosted-trees fit: its prediction is piecewise
   constant, so gradients are zero almost everywhere and SLSQP would stop where it
   starts. For such fits a second, local candidate round around the best few
   replaces the polish.
2. For smooth fits (the mixing law, linear regression) multi-start SLSQP from the
   best STARTS candidates, gradients by batched finite differences, bounds and the
   sum constraint handled by SLSQP itself. The best of all candidates and polished
   points wins, so the polish can only improve on the candidate search.

fit.predict only ever sees rows on the simplex: SLSQP's iterates may overshoot a
bound or the sum by rounding, so the objective clips and renormalizes first.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.optimize import minimize

from kiln.config import ConfigError
from kiln.formats.mixture import Mixture, save_mixture
from kiln.formats.shards import Availability, load_availability
from kiln.mixing.design import ALPHA_RANGE, check_caps, project_box_simplex

CANDIDATES = 4096  # candidate mixtures scored before polishing; one predict call
STARTS = 8  # SLSQP starts, the best distinct candidates
# Non-smooth fits: rounds of local candidates, Dirichlet(c * w) around the best few
# so far, c rising 5x a round: relative steps of about 1/sqrt(c), from 7 % to 0.3 %.
LOCAL_CONCENTRATION = (2e2, 1e3, 5e3, 2.5e4, 1.25e5)
FD_STEP = 1e-6  # finite-difference step in weight units; fits are smooth on this scale
ACTIVE_TOL = 1e-6  # a weight this close to its cap counts as on the cap
SMOOTH_METHODS = {"law", "linear"}


class Predictor(Protocol):
    domains: list[str]

    def predict(self, weights: np.ndarray, level: float = 0.9) -> Any: ...  # -> Prediction


@dataclass
class Result:
    weights: dict[str, float]  # chosen mixture, domain -> weight, in the fit's domain order
    mean: float  # fit's predicted target at the chosen mixture (without the KL term)
    lower: float  # lower end of the fit's bootstrap interval at `level`
    upper: float  # upper end
    level: float  # interval level
    natural: dict[str, float]  # natural mixture p, for comparison
    natural_mean: float  # fit's prediction at p
    natural_lower: float
    natural_upper: float
    caps: dict[str, float]  # domain -> max weight the caps allow (1 without max_epochs)
    active_caps: list[str]  # domains whose weight sits on its cap (< 1), the binding data limits
    objective: float  # mean + kl_weight * KL(w || p) at the chosen mixture
    kl: float  # KL(w || p) in nats
    target_tokens: int
    max_epochs: float | None
    kl_weight: float
    method: str  # the fit's method, "" if the predictor has none
    target: str  # the fit's target name, "" if none
    evaluations: int = 0  # predicted mixtures, candidates and finite differences included
    polished: bool = False  # whether SLSQP ran (smooth fits only)
    extra: dict = field(default_factory=dict)


def kl_divergence(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """KL(w || p) per row, with 0 log 0 = 0; p > 0 wherever w > 0 (domains without
    tokens have cap 0)."""
    w = np.atleast_2d(w)
    safe_w = np.where(w > 0, w, 1.0)
    safe_p = np.where(p > 0, p, 1.0)
    return np.sum(np.where(w > 0, w * np.log(safe_w / safe_p), 0.0), axis=1)


def optimize(fit: Predictor, availability: str | os.PathLike | dict | Availability, target_tokens: int,
             max_epochs: float | None = None, kl_weight: float = 0.0, level: float = 0.9,
             seed: int = 0) -> Result:
    avail = load_availability(availability)
    domains = list(fit.domains)
    missing_in_avail = [d for d in domains if d not in avail.tokens]
    missing_in_fit = [d for d in avail.domains if d not in domains]
    if missing_in_avail or missing_in_fit:
        parts = []
        if missing_in_avail:
            parts.append(f"in the fit but not in {avail.describe()}: {', '.join(missing_in_avail)}")
        if missing_in_fit:
            parts.append(f"in {avail.describe()} but not in the fit: {', '.join(missing_in_fit)}")
        raise ConfigError("fit and availability name different domains; " + "; ".join(parts))
    if kl_weight < 0:
        raise ConfigError(f"KL weight must be >= 0, got {kl_weight}")
    if not 0 < level < 1:
        raise ConfigError(f"interval level must be in (0, 1), got {level}")
    lower, upper = check_caps(avail, domains, target_tokens, max_epochs)
    p = avail.natural(domains)
    m = len(domains)
    count = [0]

    def objective_rows(rows: np.ndarray) -> np.ndarray:
        count[0] += len(rows)
        mean = np.asarray(fit.predict(rows, level=level).mean, dtype=np.float64)
        if kl_weight:
            mean = mean + kl_weight * kl_divergence(rows, p)
        return mean

    rng = np.random.default_rng(seed)
    candidates = _candidates(p, lower, upper, rng)
    scores = objective_rows(candidates)
    method = str(getattr(fit, "method", ""))
    smooth = method in SMOOTH_METHODS or method == ""
    polished = False
    if smooth:
        starts = _distinct_best(candidates, scores, STARTS)

        def to_simplex(x: np.ndarray) -> np.ndarray:
            x = np.clip(x, lower, upper)
            return x / x.sum()

        def f(x: np.ndarray) -> float:
            return float(objective_rows(to_simplex(x)[None])[0])

        def grad(x: np.ndarray) -> np.ndarray:
            # One predict call for all 2m probes: central differences, forward ones
            # where the weight is within a step of 0 (the fit rejects negatives).
            x = np.clip(x, lower, upper)
            plus, minus = np.repeat(x[None], m, 0), np.repeat(x[None], m, 0)
            h_minus = np.where(x > FD_STEP, FD_STEP, 0.0)
            plus[np.arange(m), np.arange(m)] += FD_STEP
            minus[np.arange(m), np.arange(m)] -= h_minus
            rows = np.vstack([plus, minus])
            rows = rows / rows.sum(axis=1, keepdims=True)
            vals = objective_rows(rows)
            return (vals[:m] - vals[m:]) / (FD_STEP + h_minus)

        bounds = list(zip(lower, upper))
        constraint = {"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones(m)}
        polished_points = []
        for x0 in starts:
            res = minimize(f, x0, jac=grad, method="SLSQP", bounds=bounds, constraints=[constraint],
                           options={"maxiter": 300, "ftol": 1e-12})
            polished_points.append(project_box_simplex(res.x, lower, upper))
        polished_points = np.vstack(polished_points)
        candidates = np.vstack([candidates, polished_points])
        scores = np.concatenate([scores, objective_rows(polished_points)])
        polished = True
    else:
        for concentration in LOCAL_CONCENTRATION:
            local = _local_candidates(_distinct_best(candidates, scores, STARTS), concentration,
                                      lower, upper, rng)
            candidates = np.vstack([candidates, local])
            scores = np.concatenate([scores, objective_rows(local)])
    best = candidates[int(np.argmin(scores))]
    both = fit.predict(np.vstack([best, p]), level=level)
    mean, lo, hi = (np.asarray(a, dtype=np.float64) for a in (both.mean, both.lower, both.upper))
    kl = float(kl_divergence(best, p)[0])
    active = [d for d, w, u in zip(domains, best, upper) if u < 1.0 and w >= u - ACTIVE_TOL]
    return Result(
        weights={d: float(w) for d, w in zip(domains, best)}, mean=float(mean[0]), lower=float(lo[0]),
        upper=float(hi[0]), level=level, natural={d: float(w) for d, w in zip(domains, p)},
        natural_mean=float(mean[1]), natural_lower=float(lo[1]), natural_upper=float(hi[1]),
        caps={d: float(u) for d, u in zip(domains, upper)}, active_caps=active,
        objective=float(mean[0] + kl_weight * kl), kl=kl, target_tokens=int(target_tokens),
        max_epochs=max_epochs, kl_weight=float(kl_weight), method=method,
        target=str(getattr(fit, "target", "")), evaluations=count[0], polished=polished)


def _candidates(p: np.ndarray, lower: np.ndarray, upper: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet draws around p (log-uniform concentration, as in the design) and
    uniform-simplex draws for the far corners, each projected onto the feasible set."""
    live = upper > 0
    n_local, n_uniform = CANDIDATES * 3 // 4, CANDIDATES // 4
    alpha = np.exp(rng.uniform(math.log(ALPHA_RANGE[0]), math.log(ALPHA_RANGE[1]), n_local))
    rows = np.zeros((n_local + n_uniform, len(p)))
    # Gamma draws with shape alpha * p_d, normalized: the Dirichlet with a per-row alpha.
    gam = rng.standard_gamma(alpha[:, None] * p[live][None, :])
    rows[:n_local, live] = gam
    rows[n_local:, live] = rng.dirichlet(np.ones(int(live.sum())), n_uniform)
    # A row where every tiny-shape gamma underflowed to 0 carries no direction.
    totals = rows.sum(axis=1)
    rows = rows[np.isfinite(totals) & (totals > 0)]
    rows = rows / rows.sum(axis=1, keepdims=True)
    return project_box_simplex(np.vstack([p, rows]), lower, upper)


def _local_candidates(centers: np.ndarray, concentration: float, lower: np.ndarray, upper: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    per = CANDIDATES // (4 * len(centers))
    rows = np.zeros((per * len(centers), centers.shape[1]))
    for i, c in enumerate(centers):
        live = c > 0
        # The + 1e-3 keeps a shape positive for weights rounded to tiny values.
        rows[i * per:(i + 1) * per, live] = rng.dirichlet(concentration * c[live] + 1e-3, per)
    return project_box_simplex(rows, lower, upper)


def _distinct_best(candidates: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """The n best candidates at least 1e-3 apart (L1), so multi-start means several basins."""
    chosen: list[np.ndarray] = []
    for i in np.argsort(scores):
        c = candidates[i]
        if all(np.abs(c - other).sum() > 1e-3 for other in chosen):
            chosen.append(c)
            if len(chosen) == n:
                break
    return np.vstack(chosen)


def write_mixture(result: Result, path: str | os.PathLike, fit_path: str | os.PathLike = "") -> Mixture:
    """The chosen mixture as a contract-4 file with its provenance; returns what was
    written (load_mixture(path) == the returned Mixture)."""
    weights = dict(result.weights)
    # The optimizer's weights sum to 1 up to rounding; fold the residue into the
    # largest weight so the file passes load_mixture's 1e-6 check with room to spare.
    residue = 1.0 - math.fsum(weights.values())
    biggest = max(weights, key=weights.get)
    weights[biggest] += residue
    provenance: dict[str, Any] = {
        "tool": "kiln mix optimize",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fit": str(fit_path),
        "method": result.method,
        "target": result.target,
        "predicted_loss": result.mean,
        "predicted_lower": result.lower,
        "predicted_upper": result.upper,
        "interval_level": result.level,
        "natural_predicted_loss": result.natural_mean,
        "target_tokens": result.target_tokens,
        "kl_weight": result.kl_weight,
        "active_caps": list(result.active_caps),
    }
    # TOML has no null: without a cap the key is left out rather than invented.
    if result.max_epochs is not None:
        provenance["max_epochs"] = float(result.max_epochs)
    mixture = Mixture(weights=weights, provenance=provenance, path=str(path))
    save_mixture(mixture, path)
    return mixture

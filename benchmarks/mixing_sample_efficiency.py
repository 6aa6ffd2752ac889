"""Mixing sample efficiency: how many proxy runs each fitting method needs.

A known 5-domain truth stands in for real proxies. Each of 5 validation losses
follows a Data Mixing Law, val_i(r) = c_i + k_i·exp(Σ_j t_ij r_j) (own-domain data
helps most: t_ii = -2.5, cross terms drawn in [-0.6, 0.3]), plus a small interaction
γ_i·r_a·r_b between two domains that no law can express, so the law is not trivially
perfect. The target is a weighted validation loss, 0.4·val_0 + 0.15·(val_1 + ... +
val_4); a sum of laws has its optimum inside the simplex. Each proxy run observes
every val_i with independent Gaussian noise of 0.75 % of its value (run-to-run noise
of small proxies).

Proxy mixtures are drawn as the design step draws them (RegMix): Dirichlet around
the natural token distribution, concentration log-uniform in [0.3, 30]. For n = 8
... 128 runs and each method (law, linear, gbm = RegMix's LightGBM, auto = chosen by
5-fold cross-validation) the script reports, averaged over seeds,

- Spearman ρ between predicted and true target on 200 held-out mixtures of the same
  design distribution (the ranking accuracy RegMix reports),
- the regret of the chosen mixture: true target at the argmin of the prediction over
  20,000 candidates (design draws and uniform Dirichlet draws), minus the true
  minimum over the same candidates; and the natural distribution's regret for scale,
- the cross-validated ρ the fit itself printed (is it an honest estimate?).

A method is "—" below its minimum number of runs. Fits use n_boot = 0: intervals
are tested in tests/mixing/test_fit.py, not timed here.

    python benchmarks/mixing_sample_efficiency.py --seeds 5

Writes benchmarks/results/mixing_sample_efficiency_<date>_<label>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, machine, versions, write_results  # noqa: E402
from kiln.config import ConfigError  # noqa: E402
from kiln.mixing.fit import fit  # noqa: E402
from kiln.mixing.table import load_runs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NATURAL = np.array([0.45, 0.25, 0.15, 0.10, 0.05])  # token shares of the 5 domains
TARGET_COEFS = [0.4, 0.15, 0.15, 0.15, 0.15]  # general validation weighted most, as a model card would
NOISE = 0.0075  # run-to-run noise, relative to the loss
CONCENTRATION = (0.3, 30.0)  # log-uniform Dirichlet concentration range around NATURAL
NS = (8, 12, 16, 24, 32, 48, 64, 128)
METHODS = ("law", "linear", "gbm", "auto")
HELD_OUT = 200
CANDIDATES = 20_000
RHO_GOAL = 0.9
REGMIX_PROXIES = 512  # RegMix's proxy count for rho ~0.97 at 1B scale (Liu et al. 2024)


class Truth:
    """The hidden per-domain laws plus interactions; fixed by its own seed."""

    def __init__(self, seed: int = 1234):
        rng = np.random.default_rng(seed)
        m = len(NATURAL)
        self.c = rng.uniform(1.8, 3.0, m)  # irreducible loss per validation domain
        self.k = rng.uniform(0.6, 1.2, m)
        self.t = rng.uniform(-0.6, 0.3, (m, m))  # t[i, j]: effect of domain j's weight on val_i
        np.fill_diagonal(self.t, -2.5)
        # Synergy the law cannot express: domain pair (a, b) helps val_i beyond their separate effects.
        self.pairs = [(1, 2), (2, 3), (0, 4), (1, 3), (0, 2)]
        self.gamma = rng.uniform(-0.25, 0.1, m)

    def val(self, W: np.ndarray) -> np.ndarray:
        """(n, m) noise-free validation losses."""
        out = self.c + self.k * np.exp(W @ self.t.T)
        for i, (a, b) in enumerate(self.pairs):
            out[:, i] += self.gamma[i] * W[:, a] * W[:, b]
        return out

    def target(self, W: np.ndarray) -> np.ndarray:
        return self.val(W) @ np.asarray(TARGET_COEFS)


def design_draws(n: int, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet around NATURAL with a log-uniform concentration per draw (RegMix)."""
    conc = np.exp(rng.uniform(*np.log(CONCENTRATION), n))
    W = np.stack([rng.dirichlet(NATURAL * a) for a in conc])
    W = np.maximum(W, 1e-12)  # a Dirichlet with tiny alpha can underflow to exact 0 rows
    return W / W.sum(axis=1, keepdims=True)


def runs_table(truth: Truth, W: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    val = truth.val(W)
    val = val * (1 + NOISE * rng.standard_normal(val.shape))
    return pl.DataFrame({**{f"w_d{j}": W[:, j] for j in range(W.shape[1])},
                         **{f"val_{i}": val[:, i] for i in range(val.shape[1])}})


def one(truth: Truth, n: int, seed: int, held: np.ndarray, cands: np.ndarray) -> dict:
    rng = np.random.default_rng(seed)
    df = runs_table(truth, design_draws(n, rng), rng)
    spec = ",".join(f"val_{i}:{c}" for i, c in enumerate(TARGET_COEFS))
    runs = load_runs(df, "w_*", spec)
    true_held, true_cands = truth.target(held), truth.target(cands)
    out = {}
    for method in METHODS:
        t0 = time.perf_counter()
        try:
            f = fit(runs, method, n_boot=0, seed=seed, verbose=False)
        except ConfigError as e:
            out[method] = {"skipped": str(e)}
            continue
        rho = float(spearmanr(f.predict(held).mean, true_held).statistic)
        pick = int(np.argmin(f.predict(cands).mean))
        cv = f.cv.get(f.method)
        out[method] = {"rho": rho, "regret": float(true_cands[pick] - true_cands.min()),
                       "chosen": f.method, "cv_rho": cv["spearman"] if isinstance(cv, dict) else None,
                       "seconds": time.perf_counter() - t0}
    return out


def runs_needed(rows: list[dict], seeds: int) -> dict:
    """Per method, the smallest n from which every larger n also reaches mean ρ >= RHO_GOAL
    (one lucky n below an unlucky one does not count)."""
    needed = {}
    for method in METHODS:
        got = sorted((r["n"], r.get("fitted") == seeds and r["rho_mean"] >= RHO_GOAL)
                     for r in rows if r["method"] == method)
        n_ok = None
        for n, ok in reversed(got):
            if not ok:
                break
            n_ok = n
        needed[method] = n_ok
    return needed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    truth = Truth()
    rng = np.random.default_rng(99)
    held = design_draws(HELD_OUT, rng)
    cands = np.vstack([design_draws(CANDIDATES // 2, rng), rng.dirichlet(np.ones(len(NATURAL)), CANDIDATES // 2),
                       NATURAL[None]])
    true_cands = truth.target(cands)
    natural_regret = float(truth.target(NATURAL[None])[0] - true_cands.min())
    best = cands[np.argmin(true_cands)]
    log(f"true optimum over candidates {true_cands.min():.4f} at {np.round(best, 3).tolist()}; "
        f"natural mix regret {natural_regret:.4f}")

    t_start = time.time()
    rows = []
    for n in NS:
        per_seed = [one(truth, n, 1000 * n + s, held, cands) for s in range(args.seeds)]
        for method in METHODS:
            got = [r[method] for r in per_seed if "rho" in r[method]]
            if not got:
                rows.append({"n": n, "method": method, "fitted": 0})
                continue
            rho = np.array([g["rho"] for g in got])
            reg = np.array([g["regret"] for g in got])
            cv = np.array([g["cv_rho"] for g in got if g["cv_rho"] is not None], dtype=float)
            rows.append({"n": n, "method": method, "fitted": len(got),
                         "rho_mean": float(rho.mean()), "rho_min": float(rho.min()),
                         "regret_mean": float(reg.mean()), "regret_max": float(reg.max()),
                         "cv_rho_mean": float(np.nanmean(cv)) if len(cv) else None,
                         "chosen": sorted({g["chosen"] for g in got}) if method == "auto" else None,
                         "seconds_mean": float(np.mean([g["seconds"] for g in got]))})
        log(f"n={n}: " + ", ".join(f"{r['method']} rho {r['rho_mean']:.3f}" for r in rows[-len(METHODS):]
                                   if r.get("fitted")))
    elapsed = time.time() - t_start

    needed = runs_needed(rows, args.seeds)

    report = {"date": date.today().isoformat(), "machine": machine(),
              "versions": versions("numpy", "scipy", "lightgbm", "polars"),
              "setup": {"domains": len(NATURAL), "natural": NATURAL.tolist(), "target_coefs": TARGET_COEFS,
                        "noise_relative": NOISE, "concentration": CONCENTRATION, "held_out": HELD_OUT,
                        "candidates": len(cands), "seeds": args.seeds, "truth_seed": 1234,
                        "true_optimum": float(true_cands.min()), "true_best_mixture": best.tolist(),
                        "natural_regret": natural_regret},
              "rows": rows, "runs_for_rho_goal": needed, "rho_goal": RHO_GOAL,
              "regmix_proxies": REGMIX_PROXIES, "elapsed_s": elapsed}

    def cell(r, key, fmt):
        return "—" if not r.get("fitted") else format(r[key], fmt)

    md = [f"# Mixing sample efficiency ({report['date']})", "",
          f"- machine: {report['machine']['nproc']} cores ({report['machine']['cpu']}); {elapsed:.0f} s in all",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
          f"- truth: {len(NATURAL)} domains, one Data Mixing Law per validation domain plus a pairwise "
          f"interaction the law cannot express; target = {' + '.join(f'{c}·val_{i}' for i, c in enumerate(TARGET_COEFS))}; "
          f"noise {NOISE:.2%} of each loss per run",
          f"- proxies: Dirichlet around natural {NATURAL.tolist()}, concentration log-uniform in {list(CONCENTRATION)}; "
          f"{args.seeds} seeds per n; held-out: {HELD_OUT} mixtures of the same distribution; "
          f"regret over {len(cands):,} candidates",
          f"- true optimum {true_cands.min():.4f} at {np.round(best, 3).tolist()}; the natural mix's regret is "
          f"{natural_regret:.4f}", "",
          "| n runs | method | held-out ρ (mean) | ρ (worst seed) | CV ρ (mean) | regret (mean) | regret (worst) | s/fit |",
          "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = f" → {'/'.join(r['chosen'])}" if r.get("chosen") else ""
        cvr = "—" if not r.get("fitted") or r["cv_rho_mean"] is None else f"{r['cv_rho_mean']:.3f}"
        md.append(f"| {r['n']} | {r['method']}{extra} | {cell(r, 'rho_mean', '.3f')} | {cell(r, 'rho_min', '.3f')} "
                  f"| {cvr} | {cell(r, 'regret_mean', '.4f')} | {cell(r, 'regret_max', '.4f')} "
                  f"| {cell(r, 'seconds_mean', '.2f')} |")
    md += ["", f"Runs needed for mean held-out ρ ≥ {RHO_GOAL} at that n and every larger n (every seed fitted): " +
           ", ".join(f"{k} {v if v else f'> {NS[-1]}'}" for k, v in needed.items()) +
           f". RegMix trained {REGMIX_PROXIES} proxies for its ρ ≈ 0.97; gbm here is its method on the same runs.",
           "", "- '—': fewer runs than the method's minimum (law m+2, linear m+1, gbm 3(m+1)); auto then "
           "chooses among the others. auto → shows the methods cross-validation chose over the seeds.",
           "- CV ρ: the 5-fold (or leave-one-out) Spearman ρ the fit reports about itself, to compare with the "
           "held-out ρ.", ""]
    markdown = "\n".join(md)
    print(markdown)
    write_results(args.out, "mixing_sample_efficiency", report, markdown, os.cpu_count() or 1)


if __name__ == "__main__":
    main()

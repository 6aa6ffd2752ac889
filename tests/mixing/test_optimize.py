"""Design, optimization under caps, the ALMR / CMR studies and the report.

The predictors here are small analytic stand-ins for kiln.mixing.fit.Fit (same
predict(weights, level) -> Prediction protocol), so every optimum is known in
closed form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from kiln.config import ConfigError
from kiln.mixing.design import design, write_plan
from kiln.mixing.optimize import kl_divergence, optimize, write_mixture
from kiln.mixing.report import sweep, write_report
from kiln.mixing.studies import almr_fit, almr_grid, cmr_fit
from kiln.formats.mixture import load_mixture

DOMAINS = ["general", "math", "code", "multilingual"]
TOKENS = {"general": 500_000, "math": 100_000, "code": 150_000, "multilingual": 250_000}  # total 1e6


def availability(tokens: dict[str, int] = TOKENS) -> dict:
    return {"format": "kiln-availability-v1", "tokenizer_hash": "x", "vocab_size": 8192, "eos_id": 0,
            "dtype": "uint16",
            "domains": {d: {"tokens": n, "documents": 1, "shards": [f"{d}/part-00000.json"]}
                        for d, n in tokens.items()},
            "total_tokens": sum(tokens.values()), "total_documents": len(tokens)}


@dataclass
class Prediction:
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


class Bowl:
    """L(w) = 2 + sum_d a_d (w_d - c_d)^2; with c on the simplex the optimum is c."""

    def __init__(self, c, a, method="law"):
        self.c, self.a = np.asarray(c, float), np.asarray(a, float)
        self.domains, self.method, self.target = list(DOMAINS), method, "val_loss"

    def predict(self, weights, level=0.9):
        w = np.atleast_2d(weights)
        assert np.all(w >= 0) and np.allclose(w.sum(axis=1), 1.0, atol=1e-12), "rows must lie on the simplex"
        mean = 2.0 + ((w - self.c) ** 2 * self.a).sum(axis=1)
        half = 0.05 * (1 + level)  # a width that depends on level, to see it passed through
        return Prediction(mean, mean - half, mean + half)


class Steps(Bowl):
    """The bowl rounded to a 1e-7 grid of loss values: piecewise constant like a GBM, with
    a flat bottom (loss < 2 + 5e-8) that reaches at most 2.2e-4 from c along any domain."""

    def predict(self, weights, level=0.9):
        p = super().predict(weights, level)
        mean = np.round(p.mean, 7)
        return Prediction(mean, mean - 0.1, mean + 0.1)


C = np.array([0.3, 0.3, 0.2, 0.2])
A = np.array([1.0, 2.0, 4.0, 8.0])


@pytest.fixture
def avail_path(tmp_path):
    path = tmp_path / "availability.json"
    path.write_text(json.dumps(availability()))
    return path


# -------------------------------------------------------------------------- design

def test_design_default_k_determinism_and_columns(avail_path, tmp_path):
    a = design(avail_path, target_tokens=400_000, seed=3)
    b = design(avail_path, target_tokens=400_000, seed=3)
    c = design(avail_path, target_tokens=400_000, seed=4)
    assert a.height == 3 * (len(DOMAINS) + 1) == 15  # Olmix's minimum, natural run included
    assert a.columns == ["run", *[f"w_{d}" for d in DOMAINS], "target_tokens", "seed"]
    assert a.equals(b) and not a.equals(c)
    assert a["run"].to_list()[:2] == ["p000", "p001"]
    w = a.select(pl.col("^w_.*$")).to_numpy()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # Run 0 is the natural distribution exactly.
    np.testing.assert_array_equal(w[0], [0.5, 0.1, 0.15, 0.25])
    assert set(a["target_tokens"]) == {400_000} and set(a["seed"]) == {3}
    write_plan(a, tmp_path / "plan.csv")
    assert pl.read_csv(tmp_path / "plan.csv").equals(a)


def test_design_respects_caps_in_every_row(avail_path):
    # 1.5 epochs of 1e6 tokens for a 1.2e6 run: caps 0.625, 0.125, 0.1875, 0.3125 (sum 1.25).
    df = design(avail_path, k=40, target_tokens=1_200_000, max_epochs=1.5, seed=0, min_weight=0.01)
    w = df.select(pl.col("^w_.*$")).to_numpy()
    caps = np.array([TOKENS[d] * 1.5 / 1_200_000 for d in DOMAINS])
    assert df.height == 40
    assert np.all(w * 1_200_000 <= np.array([TOKENS[d] for d in DOMAINS]) * 1.5 * (1 + 1e-12))
    assert np.all(w <= caps + 1e-12) and np.all(w >= 0.01 - 1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_design_moves_natural_to_closest_feasible_point(tmp_path):
    # code has 0.2 % of the tokens; a 5 % floor moves it up, and the projection takes
    # the 4.8 % from the others equally (tau = 0.016 for three free domains).
    tokens = {"general": 598_000, "math": 200_000, "code": 2_000, "multilingual": 200_000}
    df = design(availability(tokens), k=4, target_tokens=10_000, seed=0, min_weight=0.05)
    np.testing.assert_allclose(df.select(pl.col("^w_.*$")).row(0), [0.582, 0.184, 0.05, 0.184], atol=1e-12)


def test_design_infeasible_caps_name_the_domain(avail_path):
    with pytest.raises(ConfigError) as e:
        design(avail_path, target_tokens=3_000_000, max_epochs=2.0)
    msg = str(e.value)
    # 2 epochs of 1e6 tokens allow 2e6 of 3e6; math, with the fewest tokens, binds first.
    assert "caps allow only 2,000,000 of the 3,000,000 target tokens (1,000,000 missing)" in msg
    assert "math the tightest" in msg and "at least 3" in msg
    one = availability({"general": 1000})
    with pytest.raises(ConfigError, match="domain general is the binding one"):
        design(one, target_tokens=5000, max_epochs=4)


# ------------------------------------------------------------------------ optimize

def test_optimize_finds_interior_optimum(avail_path):
    for fit in (Bowl(C, A), Steps(C, A, method="gbm")):
        r = optimize(fit, avail_path, target_tokens=400_000, level=0.8)
        np.testing.assert_allclose(list(r.weights.values()), C, atol=1e-3)
        assert r.active_caps == [] and r.polished == (fit.method == "law")
    r = optimize(Bowl(C, A), avail_path, target_tokens=400_000, level=0.8)
    np.testing.assert_allclose(list(r.weights.values()), C, atol=1e-7)  # smooth: SLSQP goes much further
    assert r.mean == pytest.approx(2.0, abs=1e-12) and r.upper - r.lower == pytest.approx(0.18)
    p = np.array([0.5, 0.1, 0.15, 0.25])
    assert r.natural_mean == pytest.approx(2.0 + float(((p - C) ** 2 * A).sum()), abs=1e-12)


def test_optimize_cap_cuts_optimum_kkt(avail_path):
    # 2 epochs of 1e6 tokens for a 1e6-token run: caps 1, 0.2, 0.3, 0.5, so only math
    # (optimum 0.3) is cut. KKT for the bowl: math sits on its cap; each free domain
    # gets w_d = c_d + lambda / (2 a_d), lambda set by sum w = 1, i.e. the 0.1 math
    # loses is shared in proportion to 1 / a_d.
    r = optimize(Bowl(C, A), avail_path, target_tokens=1_000_000, max_epochs=2.0)
    w = np.array(list(r.weights.values()))
    cap = 0.2
    free = [0, 2, 3]
    lam = 2 * (C[1] - cap) / np.sum(1 / A[free])
    expect = C.copy()
    expect[1] = cap
    expect[free] = C[free] + lam / (2 * A[free])
    np.testing.assert_allclose(w, expect, atol=1e-6)
    assert r.active_caps == ["math"] and r.caps["math"] == pytest.approx(0.2)
    # the KKT multiplier of the cap is positive: the gradient pushes math above it
    assert 2 * A[1] * (w[1] - C[1]) < lam


def test_kl_pull_moves_toward_natural_monotonically(avail_path):
    p = np.array([0.5, 0.1, 0.15, 0.25])
    kls = []
    for k in [0.0, 0.01, 0.05, 0.2, 1.0, 5.0]:
        r = optimize(Bowl(C, A), avail_path, target_tokens=400_000, kl_weight=k)
        w = np.array(list(r.weights.values()))
        kls.append(float(kl_divergence(w, p)[0]))
        # Stationarity: 2 a (w - c) + k (log(w / p) + 1) is the same for every domain.
        g = 2 * A * (w - C) + k * (np.log(w / p) + 1)
        assert np.ptp(g) < 1e-5
        assert r.kl == pytest.approx(kls[-1]) and r.objective == pytest.approx(r.mean + k * kls[-1])
    assert all(a > b for a, b in zip(kls, kls[1:])), kls


def test_optimize_errors(avail_path):
    fit = Bowl(C, A)
    fit.domains = ["general", "math", "code", "web"]
    with pytest.raises(ConfigError, match="in the fit but not in .*: web; in .* but not in the fit: multilingual"):
        optimize(fit, avail_path, target_tokens=1000)
    with pytest.raises(ConfigError, match=r"caps allow only 1,000,000 of the 2,000,000 target tokens"):
        optimize(Bowl(C, A), avail_path, target_tokens=2_000_000, max_epochs=1.0)


def test_write_mixture_round_trips(avail_path, tmp_path):
    r = optimize(Bowl(C, A), avail_path, target_tokens=1_000_000, max_epochs=2.0, level=0.9)
    path = tmp_path / "mix.toml"
    written = write_mixture(r, path, fit_path="runs/FIT.json")
    loaded = load_mixture(path)
    assert loaded == written
    assert math.fsum(loaded.weights.values()) == pytest.approx(1.0, abs=1e-15)
    assert list(loaded.weights) == DOMAINS
    np.testing.assert_allclose(list(loaded.weights.values()), list(r.weights.values()), atol=1e-15)
    prov = loaded.provenance
    assert prov["tool"] == "kiln mix optimize" and prov["fit"] == "runs/FIT.json"
    assert prov["method"] == "law" and prov["target"] == "val_loss"
    assert prov["predicted_loss"] == r.mean and prov["natural_predicted_loss"] == r.natural_mean
    assert (prov["predicted_lower"], prov["predicted_upper"], prov["interval_level"]) == (r.lower, r.upper, 0.9)
    assert prov["target_tokens"] == 1_000_000 and prov["max_epochs"] == 2.0 and prov["kl_weight"] == 0.0
    assert prov["active_caps"] == ["math"] and len(prov["date"]) == 25


# ------------------------------------------------------------------------- studies

def test_almr_recovers_planted_lr_law():
    a, b, q = math.log(3e-4), -2.0, 0.05  # ln lr*(r) = a + b r: more extra language, smaller lr
    grid = almr_grid([0.0, 0.1, 0.2, 0.3, 0.4], [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
    assert grid.height == 30 and grid.columns == ["run", "ratio", "lr"]
    r, x = grid["ratio"].to_numpy(), np.log(grid["lr"].to_numpy())
    # c(r) = 2 + 0.5 (r - 0.25)^2: best ratio 0.25.
    loss = 2 + 0.5 * (r - 0.25) ** 2 + q * (x - a - b * r) ** 2
    fit = almr_fit(grid.with_columns(loss=loss), "ratio", "lr", "loss")
    assert fit.a == pytest.approx(a, abs=1e-9) and fit.b == pytest.approx(b, abs=1e-9)
    assert fit.q == pytest.approx(q, abs=1e-12)
    assert fit.best_ratio == pytest.approx(0.25, abs=1e-9)
    assert fit.best_lr == pytest.approx(math.exp(a + b * 0.25), rel=1e-8)
    assert fit.best_loss == pytest.approx(2.0, abs=1e-12) and fit.rmse < 1e-12
    np.testing.assert_allclose(fit.curve["best_lr"].to_numpy(), np.exp(a + b * np.unique(r)), rtol=1e-8)
    # With noise (sd 2e-3, ~1/20 of the loss range along lr) the relation is still found.
    rng = np.random.default_rng(0)
    noisy = almr_fit(grid.with_columns(loss=loss + rng.normal(0, 2e-3, len(loss)), ), "ratio", "lr", "loss")
    assert noisy.b == pytest.approx(b, abs=0.15) and noisy.a == pytest.approx(a, abs=0.05)


def test_almr_errors():
    grid = almr_grid([0.0, 0.1, 0.2], [1e-4, 1e-3, 1e-2])
    x = np.log(grid["lr"].to_numpy())
    with pytest.raises(ConfigError, match="no minimum in the learning rate"):
        almr_fit(grid.with_columns(loss=-x), "ratio", "lr", "loss")  # monotone: no optimum in the grid
    with pytest.raises(ConfigError, match=r"column\(s\) acc not in the table"):
        almr_fit(grid.with_columns(loss=x), "ratio", "lr", "acc")
    with pytest.raises(ConfigError, match="at least 3 distinct ratios"):
        almr_grid([0.0, 0.1], [1e-4, 1e-3, 1e-2])


def test_cmr_recovers_planted_power_law():
    A_, s, eps = 40.0, -0.25, 0.02  # r_crit(D) = 40 D^-0.25
    ratios = np.linspace(0.0, 0.6, 13)
    rows = []
    for D in [1e6, 1e7, 1e8, 1e9, 1e10]:
        rc = A_ * D ** s  # 1.26, 0.71, 0.40, 0.22, 0.13: the first two lie beyond 0.6, censored
        base = 3.0 - 0.1 * math.log10(D)
        for r in ratios:
            rows.append({"ratio": r, "tokens": D, "loss": base + eps * r / rc})  # linear: interpolation exact
    rows.append({"ratio": 0.3, "tokens": 1e8, "loss": float("nan")})
    fit = cmr_fit(pl.DataFrame(rows), "ratio", "tokens", "loss", tolerance=eps)
    assert fit.exponent == pytest.approx(s, abs=1e-9) and fit.A == pytest.approx(A_, rel=1e-8)
    assert fit.budgets["censored"].to_list() == [True, True, False, False, False]
    assert fit.predict(1e11) == pytest.approx(A_ * 1e11 ** s, rel=1e-8)
    # Positive sign is fitted too.
    pos = [{"ratio": r, "tokens": D, "loss": 1 + 0.01 * r / (1e-3 * D ** 0.3)}
           for D in [1e4, 1e5, 1e6] for r in np.linspace(0, 1, 11)]
    assert cmr_fit(pl.DataFrame(pos), tolerance=0.01).exponent == pytest.approx(0.3, abs=1e-9)
    with pytest.raises(ConfigError, match="no baseline run .ratio 0. at tokens = 1e\\+06"):
        cmr_fit(pl.DataFrame(rows).filter(pl.col("ratio") > 0), tolerance=eps)


# -------------------------------------------------------------------------- report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_writes_plots_and_tables(avail_path, tmp_path):
    fit = Bowl(C, A)
    fit.cv = {"law": {"spearman": 0.97, "mae": 0.0123, "folds": 5, "n": 15}, "gbm": "skipped: needs at least 20 runs"}
    runs = design(avail_path, target_tokens=1_000_000, seed=1)
    W = runs.select(pl.col("^w_.*$")).to_numpy()
    runs = runs.with_columns(val_loss=fit.predict(W).mean + 0.01)
    result = optimize(fit, avail_path, target_tokens=1_000_000, max_epochs=2.0)
    files = write_report(tmp_path / "report", fit, runs=runs, result=result, availability=avail_path)
    names = {"predicted_vs_actual.png", "partial_dependence.png", "mixture.png", "report.md", "report.html"}
    assert {p.name for p in files.values()} == names == {p.name for p in (tmp_path / "report").iterdir()}
    for key in ("predicted_vs_actual", "partial_dependence", "mixture"):
        data = files[key].read_bytes()
        assert data[:8] == PNG_MAGIC and 1_000 < len(data) < 150_000  # a real image, and small
    md = files["md"].read_text()
    for d in DOMAINS:  # each chosen weight in the mixture table, to 4 decimals
        assert f"| {d} | " in md and f"| {result.weights[d]:.4f} |" in md
    assert "| math | 0.1000 | 0.2000 | 0.2000 | yes |" in md  # natural, chosen (on its cap), cap
    assert "| law | 5 | 0.97 | 0.0123 |  |" in md and "(MAE 0.01)" in md  # in-sample error is the planted 0.01
    assert f"[{result.lower:.5g}, {result.upper:.5g}]" in md
    page = files["html"].read_text()
    assert page.count("<img ") == 3 and "<td>0.2000</td>" in page


def test_partial_dependence_sweep_keeps_natural_proportions():
    t, W = sweep(np.array([0.5, 0.1, 0.15, 0.25]), 1, 0.4, n=5)
    np.testing.assert_allclose(t, [0, 0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_allclose(W[:, 0] / W[:, 3], 2.0)  # general : multilingual stays 0.5 : 0.25
    np.testing.assert_allclose(W[0], [0.5 / 0.9, 0, 0.15 / 0.9, 0.25 / 0.9])


# ----------------------------------------------------------- through a real Fit

def test_real_law_fit_optimum_is_the_greedy_lp_solution(tmp_path):
    fit_mod = pytest.importorskip("kiln.mixing.fit", reason="kiln.mixing.fit not written yet")
    table_mod = pytest.importorskip("kiln.mixing.table", reason="kiln.mixing.table not written yet")
    # L = 2 + 0.5 exp(t . w), t = (-1, -0.3, 0.5): increasing in t . w, so the best
    # mixture minimizes the linear t . w: fill domain a up to its cap, then b, then c.
    tokens = {"a": 100_000, "b": 80_000, "c": 820_000}
    avail = availability(tokens)
    runs = design(avail, k=16, target_tokens=200_000, seed=0)
    W = runs.select(pl.col("^w_.*$")).to_numpy()
    t = np.array([-1.0, -0.3, 0.5])
    runs = runs.with_columns(loss=2 + 0.5 * np.exp(W @ t))
    fitted = fit_mod.fit(table_mod.load_runs(runs, "w_*", "loss"), method="law", n_boot=8, seed=0, verbose=False)
    path = tmp_path / "FIT.json"
    fitted.save(path)
    fitted = fit_mod.Fit.load(path)
    # caps at 1 epoch of a 200k-token run: a 0.5, b 0.4, c 1 -> optimum (0.5, 0.4, 0.1)
    r = optimize(fitted, avail, target_tokens=200_000, max_epochs=1.0)
    np.testing.assert_allclose(list(r.weights.values()), [0.5, 0.4, 0.1], atol=1e-3)
    assert r.active_caps == ["a", "b"] and r.mean < r.natural_mean
    assert r.mean == pytest.approx(2 + 0.5 * math.exp(-0.5 - 0.12 + 0.05), abs=1e-3)
    assert r.lower <= r.mean <= r.upper
    mix = write_mixture(r, tmp_path / "mix.toml", fit_path=path)
    assert load_mixture(tmp_path / "mix.toml").provenance["fit"] == str(path) == mix.provenance["fit"]
    files = write_report(tmp_path / "rep", fitted, runs=runs, result=r, availability=avail)
    assert "| a | 0.5000 |" not in files["md"].read_text()  # natural a is 0.1, not 0.5
    assert "| a | 0.1000 | 0.5000 | 0.5000 | yes |" in files["md"].read_text()

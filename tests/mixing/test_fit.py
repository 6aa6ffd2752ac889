"""Runs tables and the three fitting methods, on synthetic runs from a known law."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from kiln.config import ConfigError
from kiln.mixing.fit import (Fit, FitConfig, LawMethod, LawConfig, cross_validate, fit, fit_scaling,
                             predict_table)
from kiln.mixing.table import load_runs

# A law with a clear curvature (exponents spread over 3): c and k are then identifiable.
C, K, T = 2.0, 0.8, np.array([-1.5, -0.5, 0.5, 1.5])  # Σ t = 0: the representative the fit reports
M = len(T)


def law(W, c=C, k=K, t=T):
    return c + k * np.exp(W @ t)


def runs_frame(n, sigma, seed, fn=law, prefix="w_"):
    rng = np.random.default_rng(seed)
    W = rng.dirichlet(np.ones(M), n)
    y = fn(W) + rng.normal(0.0, sigma, n)
    return pl.DataFrame({**{f"{prefix}d{j}": W[:, j] for j in range(M)}, "loss": y,
                         "model_size": np.full(n, 1e8)})


def write_csv(df, tmp_path, name="runs.csv"):
    path = tmp_path / name
    df.write_csv(path)
    return path


def law_standard_errors(W, sigma):
    """Least-squares standard errors of (c, log k, t_1..t_m) at the truth, in the Σt = 0
    representative: σ² (JᵀJ)⁻¹ with t_m = -Σ_{j<m} t_j eliminated."""
    e = K * np.exp(W @ T)
    J = np.column_stack([np.ones(len(W)), e] + [e * (W[:, j] - W[:, -1]) for j in range(M - 1)])
    cov = sigma**2 * np.linalg.inv(J.T @ J)
    se = list(np.sqrt(np.diag(cov)))
    g = np.concatenate([[0.0, 0.0], -np.ones(M - 1)])  # t_m = -Σ t_j
    se.append(float(np.sqrt(g @ cov @ g)))
    return np.array(se)


def test_law_recovers_known_parameters():
    sigma = 0.004  # 0.15 % of a loss near 2.6: the run-to-run noise of small proxies
    df = runs_frame(80, sigma, seed=1)
    runs = load_runs(df, "w_*", "loss")
    p = LawMethod(LawConfig()).fit(runs.W, runs.y, np.random.default_rng(0))
    got = np.concatenate([[p["c"], p["log_k"]], p["t"]])
    want = np.concatenate([[C, np.log(K)], T])
    se = law_standard_errors(runs.W, sigma)
    # Huber with a small delta is close to least absolute deviations: efficiency 2/π for
    # Gaussian noise, so its standard error is ~1.25x the least-squares one; 5 LS
    # standard errors is 4 of the estimator's own (a two-sided 6e-5 tail per parameter).
    assert np.all(np.abs(got - want) <= 5 * se), (got, want, se)
    assert abs(sum(p["t"])) < 1e-12  # the reported representative
    # And the errors are not vacuous: the tolerance is a few percent of each parameter.
    assert np.all(5 * se[[0, 1]] < 0.1)


def test_linear_is_exact_on_linear_data_and_gbm_ranks():
    rng = np.random.default_rng(2)
    W = rng.dirichlet(np.ones(M), 30)
    beta = np.array([2.5, 2.1, 3.0, 2.7])
    df = pl.DataFrame({**{f"w_{j}": W[:, j] for j in range(M)}, "loss": W @ beta})
    runs = load_runs(df, "w_*", "loss")
    f = fit(runs, "linear", n_boot=5, verbose=False)
    np.testing.assert_allclose(f.point[0]["coef"], beta, rtol=0, atol=1e-12)
    assert f.cv["linear"]["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert f.cv["linear"]["mae"] < 1e-12
    # Every bootstrap refit of noise-free linear data is the same line: a zero-width interval.
    pred = f.predict(W[:5])
    np.testing.assert_allclose(pred.upper - pred.lower, 0, atol=1e-12)

    g = fit(load_runs(runs_frame(60, 0.004, seed=3), "w_*", "loss"), "gbm", n_boot=3, verbose=False)
    held = rng.dirichlet(np.ones(M), 200)
    from scipy.stats import spearmanr
    # Trees on 60 runs rank a smooth 4-domain law well, not perfectly.
    assert spearmanr(g.predict(held).mean, law(held)).statistic > 0.85
    again = fit(load_runs(runs_frame(60, 0.004, seed=3), "w_*", "loss"), "gbm", n_boot=3, verbose=False)
    assert again.point[0]["model"] == g.point[0]["model"]  # deterministic under a seed


def test_auto_picks_the_law_on_law_data(capsys):
    runs = load_runs(runs_frame(40, 0.004, seed=4), "w_*", "loss")
    f = fit(runs, "auto", n_boot=5, seed=0)
    assert f.method == "law"
    assert f.cv["law"]["spearman"] > max(f.cv["linear"]["spearman"], f.cv["gbm"]["spearman"])
    assert f.cv["law"]["mae"] < min(f.cv["linear"]["mae"], f.cv["gbm"]["mae"])
    err = capsys.readouterr().err
    assert "5-fold cross-validation" in err and "law" in err and "<- chosen" in err
    # cross_validate is reproducible under its seed.
    a, b = cross_validate(runs, "law", k=5, seed=7), cross_validate(runs, "law", k=5, seed=7)
    assert a == b and a.folds == 5 and a.n == 40


def test_intervals_cover_truth_at_about_the_nominal_rate():
    runs = load_runs(runs_frame(40, 0.01, seed=5), "w_*", "loss")
    f = fit(runs, "law", n_boot=50, seed=0, verbose=False)
    held = np.random.default_rng(6).dirichlet(np.ones(M), 50)
    pred = f.predict(held, level=0.9)
    truth = law(held)
    covered = np.mean((pred.lower <= truth) & (truth <= pred.upper))
    # Percentile bootstrap intervals at n = 40 under-cover a little (they ignore the
    # bias of the small-sample fit), and the 50 mixtures share one fit, so their
    # coverage events are correlated: >= 0.7 for a nominal 0.9 allows for both.
    assert covered >= 0.7, covered
    assert np.all(pred.lower <= pred.upper)
    # A wider level gives a wider interval; the interval is not degenerate.
    wide = f.predict(held, level=0.99)
    assert np.all(wide.upper - wide.lower >= pred.upper - pred.lower - 1e-15)
    assert np.median(pred.upper - pred.lower) > 0


@pytest.mark.parametrize("method", ["law", "linear", "gbm"])
def test_save_load_round_trip(tmp_path, method):
    runs = load_runs(write_csv(runs_frame(40, 0.004, seed=7), tmp_path), "w_*", "loss")
    f = fit(runs, method, n_boot=4, verbose=False)
    f.save(tmp_path / "FIT.json")
    g = Fit.load(tmp_path / "FIT.json")
    held = np.random.default_rng(8).dirichlet(np.ones(M), 20)
    a, b = f.predict(held), g.predict(held)
    for field in ("mean", "lower", "upper"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (g.method, g.domains, g.target) == (method, ["d0", "d1", "d2", "d3"], "loss")
    data = json.loads((tmp_path / "FIT.json").read_text())
    assert data["runs"] == str(tmp_path / "runs.csv") and data["n_runs"] == 40
    assert data["dropped"] == 0 and data["renormalized"] == 0
    assert set(data["cv"]) == {method}
    if method == "law":
        assert data["parameters"][0]["k"] == pytest.approx(np.exp(data["parameters"][0]["log_k"]))


def test_predict_table_keeps_row_order(tmp_path):
    runs = load_runs(runs_frame(30, 0.004, seed=9), "w_*", "loss")
    f = fit(runs, "law", n_boot=10, verbose=False)
    rng = np.random.default_rng(10)
    W = rng.dirichlet(np.ones(M), 25)
    ids = rng.permutation(25)
    # Columns in another order than the fit's domains, and rows not sorted by anything.
    mix = pl.DataFrame({"id": ids, **{f"w_d{j}": W[:, j] for j in reversed(range(M))}})
    mix.write_csv(tmp_path / "mix.csv")
    out = predict_table(f, tmp_path / "mix.csv", tmp_path / "pred.csv")
    back = pl.read_csv(tmp_path / "pred.csv")
    assert back["id"].to_list() == ids.tolist()
    assert back.columns == ["id", "w_d3", "w_d2", "w_d1", "w_d0", "predicted", "lower", "upper"]
    want = f.predict(W)
    np.testing.assert_allclose(out["predicted"].to_numpy(), want.mean, rtol=1e-15)
    np.testing.assert_allclose(back["lower"].to_numpy(), want.lower, rtol=1e-14)
    # Exact domain names work too.
    pl.DataFrame({f"d{j}": W[:, j] for j in range(M)}).write_csv(tmp_path / "mix2.csv")
    out2 = predict_table(f, tmp_path / "mix2.csv", tmp_path / "pred2.csv")
    np.testing.assert_array_equal(out2["predicted"].to_numpy(), out["predicted"].to_numpy())


def test_weighted_target_fits_each_column():
    rng = np.random.default_rng(11)
    W = rng.dirichlet(np.ones(M), 40)
    a = law(W, 2.0, 0.8, T)
    b = law(W, 1.5, 0.5, -T)  # the opposite preference: the sum has an interior optimum
    df = pl.DataFrame({**{f"weight.{j}": W[:, j] for j in range(M)}, "val_a": a, "val_b": b})
    runs = load_runs(df, "weight.*", "val_a:0.25,val_b:0.75")
    assert runs.domains == ["0", "1", "2", "3"]
    assert runs.target.name == "weighted:val_a*0.25+val_b*0.75"
    np.testing.assert_array_equal(runs.y, 0.25 * a + 0.75 * b)
    f = fit(runs, "law", n_boot=0, verbose=False)
    held = rng.dirichlet(np.ones(M), 50)
    # Noise-free laws: each column's law is recovered, so the weighted sum is exact.
    np.testing.assert_allclose(f.predict(held).mean, 0.25 * law(held, 2.0, 0.8, T) + 0.75 * law(held, 1.5, 0.5, -T),
                               rtol=1e-6)


def test_scale_mode_extrapolates_log_linear_parameters():
    # Parameters exactly linear in log D: the trend read at 8x the largest proxy is exact.
    def params(D):
        x = np.log(D / 1e8)
        return 3.0 - 0.12 * x, np.log(0.8) - 0.05 * x, T * (1 + 0.1 * x)

    rng = np.random.default_rng(12)
    runs_by_scale = {}
    for D in (1e8, 2e8, 4e8):
        c, logk, t = params(D)
        W = rng.dirichlet(np.ones(M), 30)
        df = pl.DataFrame({**{f"w_{j}": W[:, j] for j in range(M)}, "loss": law(W, c, np.exp(logk), t),
                           "tokens": np.full(30, D)})
        runs_by_scale[D] = df
    table = load_runs(pl.concat(list(runs_by_scale.values())), "w_*", "loss")
    by_scale = table.split("tokens")
    assert sorted(by_scale) == [1e8, 2e8, 4e8] and all(r.n == 30 for r in by_scale.values())
    f = fit_scaling(by_scale, target_scale=3.2e9, n_boot=4, verbose=False)
    c, logk, t = params(3.2e9)
    p = f.point[0]
    assert p["c"] == pytest.approx(c, abs=1e-5)
    assert p["log_k"] == pytest.approx(logk, abs=1e-5)
    np.testing.assert_allclose(p["t"], t, atol=1e-5)
    assert f.info["scaling"]["extrapolation"] == pytest.approx(8.0)
    with pytest.raises(ConfigError, match="2 or more scales"):
        fit_scaling({1e8: by_scale[1e8]}, 1e9)


# ------------------------------------------------------------------ bad input

def test_missing_column_names_it_and_lists_available(tmp_path):
    path = write_csv(runs_frame(10, 0.0, seed=0), tmp_path)
    with pytest.raises(ConfigError) as e:
        load_runs(path, "w_*", "val_loss")
    msg = str(e.value)
    assert "no target column 'val_loss'" in msg and "w_d0, w_d1, w_d2, w_d3, loss, model_size" in msg
    assert str(path) in msg


def test_no_weight_column(tmp_path):
    path = write_csv(runs_frame(10, 0.0, seed=0), tmp_path)
    with pytest.raises(ConfigError, match=r"no column matches the weight glob 'mix_\*'"):
        load_runs(path, "mix_*", "loss")


def test_nan_rows_dropped_with_count(tmp_path, capsys):
    df = runs_frame(20, 0.0, seed=0)
    loss = df["loss"].to_list()
    loss[3] = float("nan")
    w0 = df["w_d0"].to_list()
    w0[7] = None  # an empty CSV field
    w1 = df["w_d1"].to_list()
    w1[11] = float("nan")
    df = df.with_columns(pl.Series("loss", loss), pl.Series("w_d0", w0), pl.Series("w_d1", w1))
    runs = load_runs(write_csv(df, tmp_path), "w_*", "loss")
    assert runs.dropped == 3 and runs.n == 17
    assert "dropped 3 of 20 runs with a missing or NaN weight or target (data rows 4, 8, 12" in capsys.readouterr().err


def test_rows_not_summing_to_one_are_renormalized_with_count(tmp_path, capsys):
    df = runs_frame(12, 0.0, seed=0)
    scale = np.ones(12)
    scale[[1, 4, 5, 9]] = [2.0, 0.5, 100.0, 1 + 1e-3]
    scale[2] = 1 + 1e-7  # within the tolerance: left as it is
    df = df.with_columns([(pl.col(f"w_d{j}") * pl.Series(scale)).alias(f"w_d{j}") for j in range(M)])
    runs = load_runs(write_csv(df, tmp_path), "w_*", "loss")
    assert runs.renormalized == 4
    np.testing.assert_allclose(runs.W[[1, 4, 5, 9]].sum(axis=1), 1.0, rtol=0, atol=1e-15)
    assert "renormalized the weights of 4 of 12 runs" in capsys.readouterr().err


def test_negative_weight_names_the_row(tmp_path):
    df = runs_frame(10, 0.0, seed=0)
    w = df["w_d2"].to_list()
    w[5] = -0.1
    path = write_csv(df.with_columns(pl.Series("w_d2", w)), tmp_path)
    with pytest.raises(ConfigError, match=r"data row 6 \(counting from 1\) has a negative weight -0.1 in column 'w_d2'"):
        load_runs(path, "w_*", "loss")


def test_constant_target(tmp_path):
    df = runs_frame(9, 0.0, seed=0).with_columns(pl.lit(2.5).alias("loss"))
    with pytest.raises(ConfigError, match=r"target loss is constant \(2.5\) over 9 runs: nothing to fit"):
        load_runs(write_csv(df, tmp_path), "w_*", "loss")


@pytest.mark.parametrize("method,n,need", [("law", 5, 6), ("linear", 4, 5), ("gbm", 14, 15)])
def test_too_few_runs_names_the_minimum(method, n, need):
    runs = load_runs(runs_frame(n, 0.004, seed=0), "w_*", "loss")
    with pytest.raises(ConfigError, match=f"method {method} needs at least {need} runs for 4 domains"):
        fit(runs, method, verbose=False)


def test_auto_skips_methods_below_their_minimum():
    runs = load_runs(runs_frame(10, 0.004, seed=13), "w_*", "loss")
    f = fit(runs, "auto", n_boot=2, verbose=False, config=FitConfig())
    assert f.cv["gbm"].startswith("skipped: needs at least 15 runs")
    assert f.method in ("law", "linear")


def _with_loss(df, values, dtype=pl.Float64):
    return df.with_columns(pl.Series("loss", values, dtype=dtype))


@pytest.mark.parametrize("spelling", ["NaN", "", "nan"])
def test_all_nan_target_says_no_number(tmp_path, spelling):
    # Every spelling of a missing value reads back as null, so polars types the column as
    # String with no value at all; the message must say that, not "is String, not numeric".
    path = tmp_path / "runs.csv"
    df = runs_frame(8, 0.0, seed=0).drop("loss")
    lines = df.write_csv().splitlines()
    path.write_text("\n".join([lines[0] + ",loss"] + [line + "," + spelling for line in lines[1:]]) + "\n")
    with pytest.raises(ConfigError) as e:
        load_runs(path, "w_*", "loss")
    assert str(e.value) == (f"{path}: target column 'loss' holds no number: "
                            "all 8 rows are empty or NaN; nothing to fit")


def test_all_null_target_in_memory():
    for values, dtype in (([None] * 6, pl.Float64), ([float("nan")] * 6, pl.Float64), ([None] * 6, pl.Null)):
        with pytest.raises(ConfigError) as e:
            load_runs(_with_loss(runs_frame(6, 0.0, seed=0), values, dtype), "w_*", "loss")
        assert str(e.value) == "runs: target column 'loss' holds no number: all 6 rows are empty or NaN; nothing to fit"


def test_target_of_nan_and_inf_only_counts_both(tmp_path):
    values = [float("nan"), float("inf"), None, float("-inf"), float("nan")]
    path = write_csv(_with_loss(runs_frame(5, 0.0, seed=0), values), tmp_path)
    with pytest.raises(ConfigError) as e:
        load_runs(path, "w_*", "loss")
    assert str(e.value) == (f"{path}: target column 'loss' holds no finite number: of its 5 rows, "
                            "3 are empty or NaN and 2 are infinite; nothing to fit")


def test_all_empty_weight_column_names_it(tmp_path):
    df = runs_frame(7, 0.0, seed=0).with_columns(pl.lit(None, dtype=pl.Float64).alias("w_d2"))
    path = write_csv(df, tmp_path)
    with pytest.raises(ConfigError) as e:
        load_runs(path, "w_*", "loss")
    assert str(e.value) == (f"{path}: weight column 'w_d2' holds no number: "
                            "all 7 rows are empty or NaN; nothing to fit")


def test_text_column_still_named_with_its_first_value(tmp_path):
    df = runs_frame(4, 0.0, seed=0).with_columns(pl.Series("loss", [None, "high", "low", None]))
    with pytest.raises(ConfigError, match=r"column 'loss' is String, not numeric \(first value \['high'\]\)"):
        load_runs(write_csv(df, tmp_path), "w_*", "loss")


def test_inf_rows_dropped_with_their_own_reason(tmp_path, capsys):
    df = runs_frame(20, 0.0, seed=0)
    loss = df["loss"].to_list()
    loss[2], loss[5] = float("inf"), float("-inf")
    loss[9] = float("nan")
    w3 = df["w_d3"].to_list()
    w3[14] = float("inf")
    w3[16] = None
    df = df.with_columns(pl.Series("loss", loss), pl.Series("w_d3", w3))
    path = write_csv(df, tmp_path)
    assert "inf" in path.read_text()  # the CSV holds the literal inf, not an empty field
    runs = load_runs(path, "w_*", "loss")
    assert (runs.dropped, runs.n) == (5, 15)
    assert runs.dropped_by_reason == {"missing": 2, "infinite": 3}
    err = capsys.readouterr().err.splitlines()
    assert err == [f"kiln mix: {path}: dropped 2 of 20 runs with a missing or NaN weight or target "
                   "(data rows 10, 17, counting from 1)",
                   f"kiln mix: {path}: dropped 3 of 20 runs with an infinite weight or target "
                   "(data rows 3, 6, 15, counting from 1): a fit cannot use them"]
    assert np.isfinite(runs.W).all() and np.isfinite(runs.Y).all()


def test_inf_only_rows_are_not_called_nan(tmp_path, capsys):
    df = runs_frame(10, 0.0, seed=0)
    loss = df["loss"].to_list()
    loss[4] = float("inf")
    runs = load_runs(write_csv(_with_loss(df, loss), tmp_path), "w_*", "loss")
    err = capsys.readouterr().err
    assert "NaN" not in err and "missing" not in err
    assert "dropped 1 of 10 runs with an infinite weight or target (data rows 5, counting from 1)" in err
    assert runs.dropped_by_reason == {"infinite": 1}


def test_split_refuses_an_infinite_scale():
    df = runs_frame(8, 0.0, seed=0).with_columns(pl.Series("tokens", [1e8] * 7 + [float("inf")]))
    runs = load_runs(df, "w_*", "loss")
    with pytest.raises(ConfigError) as e:
        runs.split("tokens")
    assert str(e.value) == "runs: column 'tokens' has infinite values"

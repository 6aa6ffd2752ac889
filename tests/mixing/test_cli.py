"""`kiln mix` end to end on an external runs table chosen by column globs."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from kiln.cli import main
from kiln.mixing.fit import Fit
from kiln.mixing.optimize import optimize
from kiln.formats.mixture import load_mixture


def test_fit_predict_optimize_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    domains = ["web", "code", "books"]
    W = rng.dirichlet([2.0, 2.0, 2.0], size=24)
    # A known law with a little noise: loss falls fastest with web, then books.
    t = np.array([-1.2, -0.4, -0.8])
    y = 2.0 + 1.5 * np.exp(W @ t) + rng.normal(0, 0.002, size=len(W))
    table = pl.DataFrame({"name": [f"r{i}" for i in range(len(W))],
                          **{f"mix.{d}": W[:, i] for i, d in enumerate(domains)},
                          "eval.loss": y, "params": [1e6] * len(W)})
    table.write_parquet(tmp_path / "runs.parquet")
    assert main(["mix", "fit", str(tmp_path / "runs.parquet"), "--weights", "mix.*", "--target", "eval.loss",
                 "--method", "law", "--bootstrap", "10", "--out", str(tmp_path / "fit.json")]) == 0
    fit = Fit.load(str(tmp_path / "fit.json"))
    assert (fit.method, fit.domains) == ("law", domains)
    oof = fit.cv["law"]  # out-of-fold predictions are kept for the report's honest plot
    assert oof["actual"] == pytest.approx(list(y)) and len(oof["predicted"]) == 24
    assert np.mean(np.abs(np.array(oof["predicted"]) - np.array(oof["actual"]))) == pytest.approx(oof["mae"])
    pl.DataFrame({"mix.web": [1.0, 0.0], "mix.code": [0.0, 1.0], "mix.books": [0.0, 0.0]}).write_csv(tmp_path / "m.csv")
    assert main(["mix", "predict", str(tmp_path / "fit.json"), str(tmp_path / "m.csv"),
                 "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pl.read_csv(tmp_path / "pred.csv")
    assert pred["predicted"].to_list() == pytest.approx([2.0 + 1.5 * np.exp(-1.2), 2.0 + 1.5 * np.exp(-0.4)], abs=0.01)
    assert (pred["lower"] <= pred["predicted"]).all() and (pred["predicted"] <= pred["upper"]).all()
    availability = {"format": "kiln-availability-v1", "domains": {"web": {"tokens": 300, "documents": 1},
                                                                  "code": {"tokens": 500, "documents": 1},
                                                                  "books": {"tokens": 400, "documents": 1}}}
    (tmp_path / "availability.json").write_text(json.dumps(availability))
    # Web is best but only 300 tokens x 2 epochs of a 1000-token run: capped at 0.6; books next.
    assert main(["mix", "optimize", str(tmp_path / "fit.json"), "--availability", str(tmp_path / "availability.json"),
                 "--target-tokens", "1000", "--max-epochs", "2", "--out", str(tmp_path / "mix.toml")]) == 0
    out = capsys.readouterr().out
    assert "web" in out and "(at its cap)" in out and "90% interval" in out
    mixture = load_mixture(str(tmp_path / "mix.toml"))
    assert mixture.weights["web"] == pytest.approx(0.6, abs=1e-4)
    assert mixture.weights["books"] == pytest.approx(0.4, abs=1e-3)
    expected = optimize(fit, str(tmp_path / "availability.json"), 1000, max_epochs=2)
    assert mixture.provenance["predicted_loss"] == pytest.approx(expected.mean)
    assert main(["mix", "optimize", str(tmp_path / "fit.json"), "--availability", str(tmp_path / "availability.json"),
                 "--target-tokens", "10000", "--max-epochs", "2", "--out", str(tmp_path / "x.toml")]) == 2
    assert "caps allow only 2,400 of the 10,000 target tokens" in capsys.readouterr().err


def test_scale_mode_from_the_command_line(tmp_path):
    # Law parameters linear in log(tokens): fitted at 1e8, 2e8, 4e8 and read at 1.6e9.
    rng = np.random.default_rng(3)
    t = np.array([-1.0, 0.2, 0.8])
    frames = []
    for D in (1e8, 2e8, 4e8):
        x = np.log(D / 1e8)
        W = rng.dirichlet(np.ones(3), 20)
        y = (3.0 - 0.1 * x) + np.exp(np.log(0.8) - 0.05 * x) * np.exp(W @ t)
        frames.append(pl.DataFrame({"w_a": W[:, 0], "w_b": W[:, 1], "w_c": W[:, 2], "loss": y,
                                    "tokens": np.full(20, D)}))
    pl.concat(frames).write_csv(tmp_path / "runs.csv")
    assert main(["mix", "fit", str(tmp_path / "runs.csv"), "--weights", "w_*", "--target", "loss", "--bootstrap", "4",
                 "--scale-column", "tokens", "--target-scale", "1.6e9", "--out", str(tmp_path / "fit.json")]) == 0
    fit = Fit.load(str(tmp_path / "fit.json"))
    W = np.array([[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
    x = np.log(16.0)
    truth = (3.0 - 0.1 * x) + np.exp(np.log(0.8) - 0.05 * x) * np.exp(W @ t)
    assert fit.predict(W).mean == pytest.approx(truth, abs=1e-4)
    assert main(["mix", "fit", str(tmp_path / "runs.csv"), "--weights", "w_*", "--target", "loss",
                 "--scale-column", "tokens", "--out", str(tmp_path / "x.json")]) == 2


def test_fit_on_all_nan_target_says_so(tmp_path, capsys):
    W = np.random.default_rng(0).dirichlet([1.0, 1.0], size=6)
    path = tmp_path / "runs.csv"
    pl.DataFrame({"w_a": W[:, 0], "w_b": W[:, 1], "loss": [float("nan")] * 6}).write_csv(path)
    assert main(["mix", "fit", str(path), "--weights", "w_*", "--target", "loss",
                 "--out", str(tmp_path / "fit.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"kiln: error: {path}: target column 'loss' holds no number: all 6 rows are empty or NaN; nothing to fit")
    assert not (tmp_path / "fit.json").exists()


def test_fit_records_inf_drops_by_reason(tmp_path, capsys):
    rng = np.random.default_rng(1)
    W = rng.dirichlet([1.0, 1.0, 1.0], size=12)
    y = 2.0 + np.exp(W @ np.array([-1.0, 0.0, 1.0]))
    y[[3, 7]] = np.inf
    path = tmp_path / "runs.csv"
    pl.DataFrame({"w_a": W[:, 0], "w_b": W[:, 1], "w_c": W[:, 2], "loss": y}).write_csv(path)
    assert main(["mix", "fit", str(path), "--weights", "w_*", "--target", "loss", "--method", "linear",
                 "--bootstrap", "2", "--out", str(tmp_path / "fit.json")]) == 0
    assert (f"{path}: dropped 2 of 12 runs with an infinite weight or target (data rows 4, 8, counting from 1)"
            in capsys.readouterr().err)
    info = Fit.load(str(tmp_path / "fit.json")).info
    assert (info["n_runs"], info["dropped"], info["dropped_by_reason"]) == (10, 2, {"infinite": 2})

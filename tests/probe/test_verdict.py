"""The probe's verdict arithmetic against hand computations (contract 7's numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.config import ConfigError
from kiln.formats.probe import read_results, read_verdict, write_results, write_verdict
from kiln.probe.verdict import HELPS, HURTS, NO_EFFECT, bootstrap_interval, compare, judge, seeds_needed

T_975_2 = 4.302652729749464  # Student's t, 97.5th percentile, 2 degrees of freedom (tables)
CONTROL = {0: 2.500, 1: 2.510, 2: 2.490}


def test_three_paired_seeds_give_the_t_interval_by_hand():
    # bits per byte, candidate minus control per seed: -0.020, -0.010, -0.012
    candidate = {0: 2.480, 1: 2.500, 2: 2.478}
    c = compare(candidate, CONTROL, "eval:web")
    mean = (-0.020 - 0.010 - 0.012) / 3
    sd = math.sqrt(((-0.020 - mean) ** 2 + (-0.010 - mean) ** 2 + (-0.012 - mean) ** 2) / 2)
    half = T_975_2 * sd / math.sqrt(3)
    assert (c.seeds, c.method, c.better) == (3, "t", "lower")
    assert c.delta == pytest.approx(mean, abs=1e-12)
    assert (c.lower, c.upper) == (pytest.approx(mean - half, abs=1e-12), pytest.approx(mean + half, abs=1e-12))
    assert c.upper < 0 and c.verdict == HELPS and c.seeds_needed is None
    assert c.control_sd == pytest.approx(0.01, abs=1e-12)  # 2.50, 2.51, 2.49


def test_direction_follows_the_metric():
    worse = {s: v + 0.05 + 0.001 * s for s, v in CONTROL.items()}
    assert compare(worse, CONTROL, "val:general").verdict == HURTS  # more bits per byte
    assert compare(worse, CONTROL, "eval:mc:accuracy").verdict == HELPS  # higher accuracy
    assert compare(worse, CONTROL, "eval:mc:p_correct").better == "higher"


def test_a_straddling_interval_says_how_many_seeds_would_resolve_it():
    candidate = {0: 2.510, 1: 2.500, 2: 2.495}  # diffs 0.010, -0.010, 0.005
    c = compare(candidate, CONTROL, "eval:web")
    assert c.lower < 0 < c.upper and c.verdict == NO_EFFECT
    diffs = np.array([0.010, -0.010, 0.005])
    sd = diffs.std(ddof=1)
    n = c.seeds_needed
    from scipy.stats import t

    assert n == seeds_needed(diffs.mean(), sd)
    assert t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(diffs.mean())
    assert t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) >= abs(diffs.mean())
    assert seeds_needed(0.0, 0.1) is None and seeds_needed(1e-9, 1.0) is None


def test_five_seeds_or_more_use_a_seeded_bootstrap():
    control = {s: 2.5 for s in range(6)}
    same = {s: 2.49 for s in range(6)}
    c = compare(same, control, "eval:web")
    assert c.method == "bootstrap" and c.lower == pytest.approx(-0.01) and c.upper == pytest.approx(-0.01)
    diffs = np.array([-0.03, 0.01, -0.02, -0.015, 0.0, -0.01])
    lo, hi = bootstrap_interval(diffs)
    assert (lo, hi) == bootstrap_interval(diffs)  # reproducible
    assert diffs.min() <= lo < diffs.mean() < hi <= diffs.max()


def test_one_seed_is_no_interval_and_unpaired_seeds_are_left_out():
    c = compare({0: 2.4, 7: 2.0}, {0: 2.5, 3: 2.6}, "eval:web")
    assert (c.seeds, c.method, c.verdict) == (1, "none", NO_EFFECT)
    assert math.isnan(c.lower) and c.to_dict()["lower"] is None
    with pytest.raises(ConfigError, match="eval:web: no seed has both the candidate and the control"):
        compare({1: 2.0}, {0: 2.5}, "eval:web")


def test_judge_ranks_on_the_primary_metric_and_round_trips(tmp_path):
    rows = []
    for seed, base in CONTROL.items():
        rows.append({"arm": "control", "seed": seed, "eval:web": base, "val:math": 3.0 + seed / 100})
        rows.append({"arm": "math", "seed": seed, "eval:web": base - 0.02 - seed / 1000, "val:math": 2.8})
        rows.append({"arm": "noise", "seed": seed, "eval:web": base + 0.03 + seed / 1000, "val:math": 3.1})
    out = judge(rows, ["eval:web", "val:math"], primary="eval:web")
    assert out["ranking"] == ["math", "noise"]
    assert out["candidates"]["math"]["eval:web"]["verdict"] == HELPS
    assert out["candidates"]["noise"]["eval:web"]["verdict"] == HURTS
    write_results(str(tmp_path / "results.csv"), rows)
    assert read_results(str(tmp_path / "results.csv")).to_dicts() == rows
    write_verdict(str(tmp_path / "verdict.json"), out)
    assert {k: v for k, v in read_verdict(str(tmp_path / "verdict.json")).items() if k != "format"} == out
    with pytest.raises(ConfigError, match="primary metric 'eval:other' is not measured"):
        judge(rows, ["eval:web"], primary="eval:other")
    with pytest.raises(ConfigError, match="no control arm"):
        judge([r for r in rows if r["arm"] != "control"], ["eval:web"], primary="eval:web")

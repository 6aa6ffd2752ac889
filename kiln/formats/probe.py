"""Probe results (DESIGN.md contract 7): what `kiln probe` hands its users.

`results.csv` has one row per arm and seed: `arm` (`control` or a candidate's name),
`seed`, and one column per metric: `val:<domain>` (bits per byte on the shards'
held-out documents), `eval:<name>` (bits per byte over an evaluation set's text), and
for a multiple-choice set `eval:<name>:accuracy` and `eval:<name>:p_correct`.
`verdict.json` holds, per candidate and metric, the paired difference against the
control with its interval and verdict, and the candidates ranked on the primary metric.
"""

from __future__ import annotations

import json
import os

import polars as pl

from kiln.config import ConfigError, read_json

RESULTS_FILE, VERDICT_FILE = "results.csv", "verdict.json"
CONTROL = "control"  # the arm trained on the default mixture alone
VERDICT_FORMAT = "kiln-probe-verdict-v1"
# Metrics where a larger value is better; every other metric (bits per byte) is better lower.
HIGHER_IS_BETTER_SUFFIXES = (":accuracy", ":p_correct")


def higher_is_better(metric: str) -> bool:
    return metric.endswith(HIGHER_IS_BETTER_SUFFIXES)


def write_results(path: str, rows: list[dict]) -> None:
    """rows: {"arm", "seed", metric: value, ...}; written atomically, arms in order given."""
    frame = pl.DataFrame(rows)
    tmp = f"{path}.tmp"
    frame.write_csv(tmp)
    os.replace(tmp, path)


def read_results(path: str) -> pl.DataFrame:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no probe results here")
    frame = pl.read_csv(path)
    missing = [c for c in ("arm", "seed") if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: not a probe results table: no {missing[0]!r} column")
    return frame


def write_verdict(path: str, verdict: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": VERDICT_FORMAT, **verdict}, f, indent=2)
    os.replace(tmp, path)


def read_verdict(path: str) -> dict:
    verdict = read_json(path, "probe verdict")
    if verdict.get("format") != VERDICT_FORMAT:
        raise ConfigError(f"{path}: not a {VERDICT_FORMAT} file")
    return verdict

"""Runs tables (DESIGN.md contract 5): one row per proxy run, read from any CSV/Parquet.

The mixer accepts external tables, so nothing here assumes kiln's own column names:
weight columns are picked by a glob on column names (`"w_*"`, `"weight.*"`), and the
domain name of a column is the column with the glob's literal prefix and suffix
stripped (`w_code` -> `code`). The target is one metric column, or a weighted sum of
several (`"val_general:0.5,val_code:0.5"`); the columns are kept apart (`Runs.Y`) so a
fit can model each one on its own and add the fits, as the Data Mixing Laws paper
does for a multi-domain validation loss.

Cleaning is said, never silent: rows with a missing or NaN weight or target are
dropped and counted, rows with an infinite one likewise under their own reason (a
diverged proxy logs `inf`; no fit can use it, and calling it NaN hides what
happened), rows whose weights do not sum to 1 are renormalized and counted; a
negative weight, a missing column, a weight or target column without a single
number, or a constant target is a ConfigError that names the file and the column
(or row).
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from kiln.config import ConfigError
from kiln.formats.runs import SUM_TOLERANCE

_WILDCARDS = "*?["
# Spellings of a missing value in hand-made CSVs; all become null.
_NULLS = ["", "NA", "N/A", "nan", "NaN", "NAN", "null", "None"]


def say(msg: str) -> None:
    """One line to stderr: what the mixer did to the user's table (drops, renormalizations)."""
    print(f"kiln mix: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    columns: list[str]  # metric columns, in the order given
    coefs: list[float]  # weight of each column in the target (1.0 for a single column)

    @property
    def name(self) -> str:
        if len(self.columns) == 1 and self.coefs[0] == 1.0:
            return self.columns[0]
        return "weighted:" + "+".join(f"{c}*{w:g}" for c, w in zip(self.columns, self.coefs))


def parse_target(spec: str, columns: list[str] | None = None) -> Target:
    """`"loss"` -> one column; `"a:0.5,b:0.5"` -> 0.5·a + 0.5·b. A spec that is itself a
    column name of the table is taken as that column, so names with ':' still work."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("target: empty; give a column name or 'col:weight,col:weight'")
    if columns is not None and spec in columns:
        return Target([spec], [1.0])
    if ":" not in spec:
        return Target([spec], [1.0])
    names, coefs = [], []
    for part in spec.split(","):
        name, _, weight = part.strip().rpartition(":")
        try:
            coef = float(weight)
        except ValueError:
            raise ConfigError(f"target {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not name or not math.isfinite(coef):
            raise ConfigError(f"target {spec!r}: expected 'column:weight' items, got {part!r}")
        if name in names:
            raise ConfigError(f"target {spec!r}: column {name!r} given twice")
        names.append(name)
        coefs.append(coef)
    return Target(names, coefs)


def glob_affixes(glob: str) -> tuple[str, str]:
    """The literal prefix (before the first wildcard) and suffix (after the last) of a glob."""
    first = min((glob.find(c) for c in _WILDCARDS if c in glob), default=-1)
    if first < 0:
        return glob, ""
    last = max(glob.rfind("*"), glob.rfind("?"), glob.rfind("]"))
    return glob[:first], glob[last + 1:]


def match_weight_columns(columns: list[str], glob: str, where: str) -> tuple[list[str], list[str]]:
    """(weight columns in table order, their domain names) for the columns matching `glob`."""
    prefix, suffix = glob_affixes(glob)
    cols = [c for c in columns if fnmatch.fnmatchcase(c, glob)]
    if not cols:
        raise ConfigError(f"{where}: no column matches the weight glob {glob!r} "
                          f"(columns: {', '.join(columns)})")
    domains = []
    for c in cols:
        domain = c[len(prefix):len(c) - len(suffix)] if suffix else c[len(prefix):]
        if not domain:
            raise ConfigError(f"{where}: weight column {c!r} leaves an empty domain name once the glob "
                              f"{glob!r}'s prefix {prefix!r} and suffix {suffix!r} are stripped")
        domains.append(domain)
    return cols, domains


def read_table(path: str | os.PathLike) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pl.read_csv(path, null_values=_NULLS, infer_schema_length=None)
    if suffix in (".parquet", ".pq"):
        return pl.read_parquet(path)
    raise ConfigError(f"{path}: expected a .csv or .parquet runs table, got {suffix or 'no suffix'!r}")


def numeric_column(df: pl.DataFrame, col: str, where: str) -> np.ndarray:
    """The column as float64 with NaN for missing; a text column is an error naming it."""
    s = df[col]
    # A CSV column holding only missing spellings has no value to infer a type from and
    # reads back as String (or Null): it is a column of missing numbers, not of text.
    if s.dtype == pl.Null or s.null_count() == len(s):
        return np.full(len(s), np.nan)
    if not s.dtype.is_numeric():
        raise ConfigError(f"{where}: column {col!r} is {s.dtype}, not numeric "
                          f"(first value {s.drop_nulls().head(1).to_list()})")
    return s.cast(pl.Float64).fill_null(float("nan")).to_numpy().copy()


@dataclass
class Runs:
    domains: list[str]  # domain names, in the order of the weight columns in the table
    W: np.ndarray  # (n, m) mixture weights, rows summing to 1 after renormalization
    Y: np.ndarray  # (n, p) the target's metric columns, NaN-free
    target: Target  # which columns and their weights: y = Y @ coefs
    frame: pl.DataFrame  # the kept rows of the table, all columns, unmodified
    weight_columns: list[str]  # the table's column for each domain
    weights_glob: str = ""  # the glob the weight columns were chosen with
    path: str = ""  # the file read, for provenance and errors
    dropped: int = 0  # rows dropped for a missing/NaN or infinite weight or target
    renormalized: int = 0  # rows whose weights were rescaled to sum to 1
    dropped_by_reason: dict[str, int] = field(default_factory=dict)  # "missing" / "infinite" -> rows

    @property
    def y(self) -> np.ndarray:
        return self.Y @ np.asarray(self.target.coefs)  # (n,)

    @property
    def n(self) -> int:
        return len(self.W)

    @property
    def m(self) -> int:
        return len(self.domains)

    def subset(self, idx: np.ndarray) -> "Runs":
        """Rows `idx` (repeats allowed: a bootstrap resample), counts kept for provenance."""
        idx = np.asarray(idx, dtype=np.int64)
        return Runs(self.domains, self.W[idx], self.Y[idx], self.target, self.frame[idx],
                    self.weight_columns, self.weights_glob, self.path, self.dropped, self.renormalized,
                    self.dropped_by_reason)

    def split(self, column: str) -> dict[float, "Runs"]:
        """Runs grouped by the value of `column` (model size or tokens): scale -> runs."""
        if column not in self.frame.columns:
            raise ConfigError(f"{self.path or 'runs'}: no column {column!r} to split scales by "
                              f"(columns: {', '.join(self.frame.columns)})")
        values = numeric_column(self.frame, column, self.path or "runs")
        if np.isnan(values).any():
            raise ConfigError(f"{self.path or 'runs'}: column {column!r} has missing values")
        if np.isinf(values).any():  # an inf scale would be a group of its own, fitted as a scale
            raise ConfigError(f"{self.path or 'runs'}: column {column!r} has infinite values")
        return {float(v): self.subset(np.flatnonzero(values == v)) for v in np.unique(values)}


def _data_rows(rows: np.ndarray) -> str:
    """'data rows 3, 6, counting from 1' for 0-based row indexes, the first ten listed."""
    listed = ", ".join(str(r + 1) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    return f"data rows {listed}, counting from 1"


def _require_a_number(values: np.ndarray, col: str, kind: str, where: str) -> None:
    """A weight or target column with no finite value is an error of its own: dropping
    every row would only say "no runs left" and hide which column is empty."""
    if len(values) == 0 or np.isfinite(values).any():
        return
    n, nan = len(values), int(np.isnan(values).sum())
    if nan == n:
        raise ConfigError(f"{where}: {kind} column {col!r} holds no number: "
                          f"all {n} rows are empty or NaN; nothing to fit")
    raise ConfigError(f"{where}: {kind} column {col!r} holds no finite number: of its {n} rows, "
                      f"{nan} are empty or NaN and {n - nan} are infinite; nothing to fit")


def load_runs(path: str | os.PathLike | pl.DataFrame, weights_glob: str, targets: str) -> Runs:
    """Read a runs table and pick its weight and target columns (see the module doc).

    `path` may also be a polars DataFrame already in memory (then errors say "runs")."""
    if isinstance(path, pl.DataFrame):
        df, where = path, "runs"
    else:
        df, where = read_table(path), str(path)
    columns = df.columns
    target = parse_target(targets, columns)
    for col in target.columns:
        if col not in columns:
            raise ConfigError(f"{where}: no target column {col!r} (columns: {', '.join(columns)})")
    wcols, domains = match_weight_columns(columns, weights_glob, where)
    clash = sorted(set(wcols) & set(target.columns))
    if clash:
        raise ConfigError(f"{where}: column {clash[0]!r} matches the weight glob {weights_glob!r} "
                          "and is also a target; narrow the glob")
    W = np.column_stack([numeric_column(df, c, where) for c in wcols])  # (n, m)
    Y = np.column_stack([numeric_column(df, c, where) for c in target.columns])  # (n, p)

    for kind, cols, values in (("weight", wcols, W), ("target", target.columns, Y)):
        for j, col in enumerate(cols):
            _require_a_number(values[:, j], col, kind, where)

    # A row with a NaN is "missing" even if another of its cells is infinite: the
    # reasons partition the dropped rows, so their counts add up to `dropped`.
    missing = np.isnan(W).any(axis=1) | np.isnan(Y).any(axis=1)
    infinite = ~missing & (np.isinf(W).any(axis=1) | np.isinf(Y).any(axis=1))
    by_reason = {}
    for reason, rows, what, why in (("missing", missing, "a missing or NaN", ""),
                                    ("infinite", infinite, "an infinite", ": a fit cannot use them")):
        if rows.any():
            by_reason[reason] = int(rows.sum())
            say(f"{where}: dropped {int(rows.sum())} of {len(df)} runs with {what} weight or target "
                f"({_data_rows(np.flatnonzero(rows))}){why}")
    bad = missing | infinite
    dropped = int(bad.sum())
    keep = np.flatnonzero(~bad)
    W, Y, frame = W[keep], Y[keep], df[keep]

    neg = np.argwhere(W < 0)
    if len(neg):
        i, j = neg[0]
        raise ConfigError(f"{where}: data row {keep[i] + 1} (counting from 1) has a negative weight "
                          f"{float(W[i, j])!r} in column {wcols[j]!r}")
    sums = W.sum(axis=1)
    zero = np.flatnonzero(sums == 0)
    if len(zero):
        raise ConfigError(f"{where}: data row {keep[zero[0]] + 1} (counting from 1) has all weights 0")
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    renormalized = int(off.sum())
    if renormalized:
        say(f"{where}: renormalized the weights of {renormalized} of {len(W)} runs to sum to 1 "
            f"(sums from {sums[off].min():.6g} to {sums[off].max():.6g})")
        W = W / sums[:, None]

    if len(W) == 0:
        raise ConfigError(f"{where}: no runs left after dropping rows with missing or infinite values")
    for k, col in enumerate(target.columns):
        if np.ptp(Y[:, k]) == 0:
            raise ConfigError(f"{where}: target {col} is constant ({Y[0, k]:g}) over {len(Y)} runs: "
                              "nothing to fit")
    return Runs(domains=domains, W=W, Y=Y, target=target, frame=frame, weight_columns=wcols,
                weights_glob=weights_glob, path="" if where == "runs" else where,
                dropped=dropped, renormalized=renormalized, dropped_by_reason=by_reason)

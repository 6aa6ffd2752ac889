"""Accounting (DESIGN.md contract 2): every stage counts in, kept and dropped by reason.

A stage's output rows carry `drop_reason` (null when kept) and `_in_bytes` (the
size of what came in), one output row per input row. Written stages count rows per
`drop_reason=` partition from the Parquet footers and take totals from a Spark
Observation of the same job (kiln.curation.stage.run_stage); in-memory runs use one groupBy
(`collect_stats`). `in == kept + sum(dropped)` compares two independent counts
there, and `StageStats.check` fails the stage before stats.json is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import polars as pl


@dataclass
class StageStats:
    stage: str
    docs_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_kept: int = 0
    chars_kept: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check(self) -> None:
        if self.docs_in != self.kept + self.dropped_total:
            raise AssertionError(
                f"stage {self.stage}: in={self.docs_in} != kept={self.kept} + dropped={self.dropped_total}"
            )

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["dropped_total"] = self.dropped_total
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageStats:
        d = json.loads(text)
        d.pop("dropped_total", None)
        return cls(**d)


def funnel_frame(all_stats: list[StageStats]) -> pl.DataFrame:
    """One row per stage and drop reason (reason '' for the stage's totals)."""
    rows = []
    for s in all_stats:
        rows.append(
            {"stage": s.stage, "reason": "", "docs": s.docs_in, "kept": s.kept,
             "dropped": s.dropped_total, "pct_dropped": _pct(s.dropped_total, s.docs_in),
             "mb_in": s.bytes_in / 1e6, "mb_kept": s.bytes_kept / 1e6}
        )
        # Largest first; a stats.json read back has its reasons in key order.
        for reason, n in sorted(s.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append(
                {"stage": s.stage, "reason": reason, "docs": None, "kept": None, "dropped": n,
                 "pct_dropped": _pct(n, s.docs_in), "mb_in": None, "mb_kept": None}
            )
    return pl.DataFrame(rows, schema={"stage": pl.String, "reason": pl.String, "docs": pl.Int64,
                                      "kept": pl.Int64, "dropped": pl.Int64, "pct_dropped": pl.Float64,
                                      "mb_in": pl.Float64, "mb_kept": pl.Float64})


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


def format_funnel(all_stats: list[StageStats]) -> str:
    frame = funnel_frame(all_stats)
    metrics = {s.stage: s.extra.get("metrics") for s in all_stats}
    header = f"{'stage':<14} {'drop reason':<34} {'docs in':>8} {'kept':>8} {'dropped':>8} {'% of in':>8} {'MB in':>9} {'MB kept':>9}"
    lines = ["", "kiln funnel", header, "-" * len(header)]
    for r in frame.iter_rows(named=True):
        if r["reason"] == "":
            lines.append(
                f"{r['stage']:<14} {'(all)':<34} {r['docs']:>8} {r['kept']:>8} {r['dropped']:>8} "
                f"{r['pct_dropped']:>7.1f}% {r['mb_in']:>9.2f} {r['mb_kept']:>9.2f}"
            )
        else:
            lines.append(
                f"{'':<14} {r['reason']:<34} {'':>8} {'':>8} {r['dropped']:>8} "
                f"{r['pct_dropped']:>7.1f}%"
            )
        if r["reason"] == "" and metrics.get(r["stage"]):
            lines.append(f"{'':<14} " + ", ".join(f"{k} {v}" for k, v in metrics[r["stage"]].items()))
    if all_stats:
        first, last = all_stats[0], all_stats[-1]
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<14} {'':<34} {first.docs_in:>8} {last.kept:>8} "
            f"{first.docs_in - last.kept:>8} {_pct(first.docs_in - last.kept, first.docs_in):>7.1f}%"
        )
    return "\n".join(lines)

"""The mixing report: plots and tables that say what the fit believes and how sure it is.

Three small PNGs (matplotlib, Agg) and report.md / report.html that link them:
- predicted vs actual on the runs: the in-sample fit with the bootstrap interval as
  error bars, and each run's cross-validated (out-of-fold) prediction, the honest
  accuracy, which the fit keeps from its cross-validation.
- predicted target against each domain's weight, partial-dependence style: the
  domain's weight goes from 0 to its cap while the other domains keep their natural
  proportions (scaled to fill the rest), with the bootstrap band; the natural and
  chosen weights are marked.
- the chosen mixture against the natural one, as bars.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display, even where one exists
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from kiln.formats.runs import WEIGHT_PREFIX  # noqa: E402
from kiln.formats.shards import Availability, load_availability  # noqa: E402
from kiln.mixing.table import read_table  # noqa: E402

DPI = 80  # 5 x 3.5 in at 80 dpi: a 400 x 280 PNG, tens of kB
SWEEP_POINTS = 41  # points per partial-dependence curve


def write_report(out_dir: str | os.PathLike, fit: Any, runs: pl.DataFrame | str | os.PathLike | None = None,
                 result: Any = None, availability: str | os.PathLike | dict | Availability | None = None,
                 level: float = 0.9) -> dict[str, Path]:
    """Write the PNGs, report.md and report.html into out_dir; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    domains = list(fit.domains)
    avail = load_availability(availability) if availability is not None else None
    natural = _natural(domains, avail, result, runs, fit)
    caps = np.array([result.caps[d] for d in domains]) if result is not None else np.ones(len(domains))
    level = result.level if result is not None else level
    written: dict[str, Path] = {}
    sections: list[tuple[str, list]] = []  # (heading, blocks); a block is text, a table or an image

    sections.append(("Fit", [f"Target `{fit.target}` fitted by the **{fit.method}** method over "
                             f"{len(domains)} domains ({', '.join(domains)})."]))
    cv = getattr(fit, "cv", None) or {}
    if cv:
        rows = [[name, "", "", "", r] if isinstance(r, str) else
                [name, str(r.get("folds", "")), _fmt(r.get("spearman")), _fmt(r.get("mae")), ""]
                for name, r in cv.items()]
        sections.append(("Cross-validation", [
            "Out-of-fold accuracy of each method tried (Spearman ρ ranks mixtures; MAE in target units).",
            (["method", "folds", "Spearman ρ", "MAE", "note"], rows)]))

    if runs is not None:
        W, y = _runs_matrix(runs, fit)
        pred = fit.predict(W, level=level)
        cv = (getattr(fit, "cv", None) or {}).get(getattr(fit, "method", ""))
        written["predicted_vs_actual"] = _plot_pred_actual(out / "predicted_vs_actual.png", y, pred, level,
                                                           cv if isinstance(cv, dict) else None)
        sections.append(("Predicted vs actual", [
            f"In-sample predictions on the {len(y)} runs with {level:.0%} bootstrap intervals "
            f"(MAE {np.mean(np.abs(pred.mean - y)):.4g}); see the cross-validation table for held-out accuracy.",
            ("image", "predicted_vs_actual.png")]))

    written["partial_dependence"] = _plot_partial(out / "partial_dependence.png", fit, natural, caps, result, level)
    sections.append(("Predicted target against each domain's weight", [
        "Each panel varies one domain's weight from 0 to its cap, the others keeping their natural "
        f"proportions; the band is the {level:.0%} bootstrap interval.", ("image", "partial_dependence.png")]))

    if result is not None:
        written["mixture"] = _plot_mixture(out / "mixture.png", domains, natural, result)
        rows = [[d, f"{natural[i]:.4f}", f"{result.weights[d]:.4f}", f"{caps[i]:.4f}",
                 "yes" if d in result.active_caps else ""] for i, d in enumerate(domains)]
        sections.append(("Chosen mixture", [
            (["domain", "natural", "chosen", "cap", "on cap"], rows),
            (["mixture", f"predicted {fit.target}", f"{level:.0%} interval"],
             [["chosen", f"{result.mean:.5g}", f"[{result.lower:.5g}, {result.upper:.5g}]"],
              ["natural", f"{result.natural_mean:.5g}",
               f"[{result.natural_lower:.5g}, {result.natural_upper:.5g}]"]]),
            f"Target tokens {result.target_tokens:,}; max epochs "
            f"{'none' if result.max_epochs is None else f'{result.max_epochs:g}'}; KL weight {result.kl_weight:g}.",
            ("image", "mixture.png")]))

    md, page = _render(sections)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(page, encoding="utf-8")
    written["md"], written["html"] = out / "report.md", out / "report.html"
    return written


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x if x is not None else "")


def _natural(domains, avail, result, runs, fit) -> np.ndarray:
    """The reference mixture the sweeps hold the other domains at: availability's
    natural distribution, else the optimizer's, else the runs' mean, else uniform."""
    if avail is not None:
        return avail.natural(domains)
    if result is not None:
        return np.array([result.natural[d] for d in domains])
    if runs is not None:
        return _runs_matrix(runs, fit)[0].mean(axis=0)
    return np.full(len(domains), 1.0 / len(domains))


def _runs_matrix(runs, fit) -> tuple[np.ndarray, np.ndarray]:
    """Weights (in the fit's domain order, renormalized) and the fitted target from a
    runs table: the fit's own weight columns if it recorded them, else columns named
    by domain or w_<domain>."""
    df = runs if isinstance(runs, pl.DataFrame) else read_table(runs)
    info = getattr(fit, "info", None) or {}
    recorded = info.get("weight_columns") or []
    if len(recorded) == len(fit.domains) and all(c in df.columns for c in recorded):
        cols = list(recorded)
    else:
        cols = [d if d in df.columns else WEIGHT_PREFIX + d for d in fit.domains]
    W = df.select([pl.col(c).cast(pl.Float64) for c in cols]).to_numpy()
    columns = getattr(fit, "target_columns", None) or [fit.target]
    coefs = getattr(fit, "target_coefs", None) or [1.0] * len(columns)
    y = sum(c * df[col].cast(pl.Float64).to_numpy() for c, col in zip(coefs, columns))
    keep = np.isfinite(W).all(axis=1) & np.isfinite(y)
    W, y = W[keep], y[keep]
    return W / W.sum(axis=1, keepdims=True), y


def _plot_pred_actual(path: Path, y, pred, level, oof: dict | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=DPI)
    err = np.vstack([np.maximum(pred.mean - pred.lower, 0), np.maximum(pred.upper - pred.mean, 0)])
    ax.errorbar(y, pred.mean, yerr=err, fmt="o", ms=3, lw=0.8, capsize=2, color="tab:blue",
                label=f"in-sample, {level:.0%} interval")
    lo, hi = float(min(y.min(), pred.lower.min())), float(max(y.max(), pred.upper.max()))
    title = f"predicted vs actual (in-sample, {level:.0%} interval)"
    if oof and oof.get("predicted"):
        # The honest picture: each run predicted by a fit that never saw it.
        ax.plot(oof["actual"], oof["predicted"], "x", ms=4, color="tab:red", label="cross-validated")
        lo = min(lo, float(np.min(oof["predicted"])))
        hi = max(hi, float(np.max(oof["predicted"])))
        title = "predicted vs actual"
        ax.legend(fontsize=7)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="actual", ylabel="predicted", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep(natural: np.ndarray, j: int, cap: float, n: int = SWEEP_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Mixtures with domain j's weight t from 0 to cap, the rest in natural proportions."""
    t = np.linspace(0.0, cap, n)
    rest = np.delete(natural, j)
    rest = rest / rest.sum() if rest.sum() > 0 else np.full(len(rest), 1.0 / max(len(rest), 1))
    W = np.zeros((n, len(natural)))
    W[:, j] = t
    W[:, np.arange(len(natural)) != j] = (1 - t)[:, None] * rest[None, :]
    return t, W


def _plot_partial(path: Path, fit, natural, caps, result, level) -> Path:
    m = len(fit.domains)
    cols = min(m, 3)
    rows = -(-m // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), dpi=DPI, squeeze=False)
    for j, d in enumerate(fit.domains):
        ax = axes[j // cols][j % cols]
        # With one domain there is no rest to rescale; its weight is 1 by definition.
        cap = float(caps[j]) if m > 1 else 1.0
        t, W = sweep(natural, j, cap) if m > 1 else (np.ones(1), np.ones((1, 1)))
        p = fit.predict(W, level=level)
        ax.fill_between(t, p.lower, p.upper, alpha=0.25, color="tab:blue", lw=0)
        ax.plot(t, p.mean, color="tab:blue", lw=1.2)
        ax.axvline(natural[j], color="gray", ls=":", lw=1, label="natural")
        if result is not None:
            ax.axvline(result.weights[d], color="tab:red", ls="--", lw=1, label="chosen")
        ax.set_title(d, fontsize=9)
        ax.tick_params(labelsize=7)
    for k in range(m, rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("domain weight", fontsize=8)
    fig.supylabel(f"predicted {fit.target}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_mixture(path: Path, domains, natural, result) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=DPI)
    x = np.arange(len(domains))
    ax.bar(x - 0.2, natural, 0.4, label="natural", color="gray")
    ax.bar(x + 0.2, [result.weights[d] for d in domains], 0.4, label="chosen", color="tab:red")
    ax.set_xticks(x, domains, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="weight", title="chosen mixture vs natural")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _render(sections) -> tuple[str, str]:
    md = ["# Mixing report", ""]
    page = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Mixing report</title>",
            "<style>body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
            "<h1>Mixing report</h1>"]
    for heading, blocks in sections:
        md += [f"## {heading}", ""]
        page.append(f"<h2>{html.escape(heading)}</h2>")
        for block in blocks:
            if isinstance(block, str):
                md += [block, ""]
                page.append(f"<p>{html.escape(block).replace('**', '')}</p>")
            elif block[0] == "image":
                md += [f"![{block[1]}]({block[1]})", ""]
                page.append(f"<p><img src=\"{html.escape(block[1])}\" alt=\"{html.escape(block[1])}\"></p>")
            else:
                header, rows = block
                md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                md += ["| " + " | ".join(r) + " |" for r in rows]
                md.append("")
                page.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                page += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                page.append("</table>")
    page.append("</body></html>")
    return "\n".join(md), "\n".join(page)

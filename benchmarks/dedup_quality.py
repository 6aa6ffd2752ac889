"""MinHash dedup quality: measured detection rate against the LSH theory.

A corpus of real English prose (docstrings of the Python standard library) gets
planted near-duplicate pairs whose exact Jaccard similarity s (over kiln's own
shingles: word 5-grams of lower-cased tokens, `kiln.curation.dedup.shingles`) is
known and spread over five buckets, [0.5,0.6) ... [0.9,1.0]. kiln's
`MinHashDedupStage` runs over all documents on Spark, and for each bucket this
reports

- the measured detection rate (base and variant end in the same `minhash_cluster`),
- the theoretical rate, the mean over the bucket's pairs of P(s) = 1 - (1 - s^r)^b
  for the configured b bands and r rows, and the difference. Target: |diff| <= 0.05.
- precision: among all document pairs that share a cluster, the fraction whose
  exact Jaccard is >= 0.5 (the lowest planted similarity), with and without the
  stage's exact-Jaccard verification when `MinHashConfig` has a `verify` field.
  Target: >= 0.99 with verification on.

Every pair has its own base document, and bases are checked to be mutually
dissimilar (exact Jaccard < 0.2), so a pair is found through its own LSH bands and
not through a third document. The detection of one pair is a single Bernoulli
trial of probability P(s) over the random choice of hash functions; to get a
standard error small enough to judge a +/-0.05 target, the stage is run
`--repeats` times with MinHash seeds seed, seed+1, ... (independent hash
families) over the same corpus and the trials are pooled. The binomial standard
error of each bucket's rate is reported next to it.

    python benchmarks/dedup_quality.py --pairs-per-bucket 100 --repeats 4

The table is printed and written with a JSON of the same numbers to
`benchmarks/results/dedup_quality_<date>_<N>core.{md,json}`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import random
import sys
import sysconfig
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

# Before pyspark is imported: no network, loopback only, and Spark's Python
# workers must run this interpreter (the one with kiln's dependencies).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from common import log, machine, versions, write_results  # noqa: E402
from kiln.curation.dedup import MinHashConfig, MinHashDedupStage, shingles  # noqa: E402

BUCKETS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]  # last one includes 1.0
PRECISION_THRESHOLD = 0.5  # a merged pair is "true" when its exact Jaccard is at least the lowest planted s
MAX_BASE_JACCARD = 0.2  # bases more similar than this to an earlier base are dropped
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 300, 400, 600
TARGET = 0.05  # allowed |measured - theoretical| per bucket
RESULTS = Path(__file__).resolve().parent / "results"


def shingle_set(text: str, ngram: int) -> set[bytes]:
    # kiln's own shingling, with the stage's default limit: s is exactly what the stage hashes.
    return shingles(text, ngram, MinHashConfig().max_shingles)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def stdlib_docstrings() -> list[list[str]]:
    """Per stdlib module (tests and IDLE left out: many near-copies), its docstrings
    in source order. Module, class and function docstrings are real English prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [d for d in docs if d and len(d.split()) >= 5]
        if docs:
            modules.append(docs)
    return modules


def chunk_module(docs: list[str]) -> list[str]:
    """Consecutive docstrings of one module joined into documents of MIN..MAX words
    (cut at docstring boundaries, near TARGET_WORDS); a short tail is dropped."""
    out, current, words = [], [], 0
    for doc in docs:
        n = len(doc.split())
        if n > MAX_WORDS:  # one very long docstring: its first MAX_WORDS words on their own
            doc, n = " ".join(doc.split()[:MAX_WORDS]), MAX_WORDS
        if words + n > MAX_WORDS and words >= MIN_WORDS:
            out.append("\n\n".join(current))
            current, words = [], 0
        elif words + n > MAX_WORDS:  # would overflow while still short: start over from this docstring
            current, words = [], 0
        current.append(doc)
        words += n
        if words >= TARGET_WORDS:
            out.append("\n\n".join(current))
            current, words = [], 0
    if words >= MIN_WORDS:
        out.append("\n\n".join(current))
    return out


def dissimilar_bases(candidates: list[str], ngram: int, limit: int) -> list[str]:
    """Greedily keep candidates whose exact Jaccard with every kept base is below
    MAX_BASE_JACCARD (shared shingles counted through an inverted index, so this is
    not quadratic in set operations). Stops at `limit` bases."""
    kept, kept_sets = [], []
    index: dict[bytes, list[int]] = defaultdict(list)
    for text in candidates:
        sh = shingle_set(text, ngram)
        if len(sh) < MIN_WORDS // 2:  # mostly repeated phrases: not prose
            continue
        shared: dict[int, int] = defaultdict(int)
        for s in sh:
            for j in index.get(s, ()):
                shared[j] += 1
        if any(n / (len(sh) + len(kept_sets[j]) - n) >= MAX_BASE_JACCARD for j, n in shared.items()):
            continue
        for s in sh:
            index[s].append(len(kept))
        kept.append(text)
        kept_sets.append(sh)
        if len(kept) >= limit:
            break
    return kept


def make_variant(base: str, lo: float, hi: float, rng: random.Random, vocab: list[str],
                 ngram: int) -> tuple[str, float] | None:
    """A copy of `base` with k words edited (each replaced by a random stdlib word or
    deleted) whose exact Jaccard with the base lies in [lo, hi) ([lo, 1.0] for the
    top bucket). The edit positions and replacements are drawn once, and edits are
    applied as a prefix of that list, so J falls (almost) monotonically in k and a
    bisection on k finds the count nearest a target s drawn uniformly in the bucket."""
    words = base.split()
    base_set = shingle_set(base, ngram)
    order = list(range(len(words)))
    rng.shuffle(order)
    edits = [(pos, rng.choice(vocab) if rng.random() < 0.5 else None) for pos in order]
    target = rng.uniform(lo, hi)

    def variant(k: int) -> tuple[str, float]:
        new = list(words)
        for pos, word in edits[:k]:
            new[pos] = word
        text = " ".join(w for w in new if w is not None)
        return text, jaccard(base_set, shingle_set(text, ngram))

    top = hi >= 1.0
    in_bucket = (lambda s: lo <= s <= hi) if top else (lambda s: lo <= s < hi)
    a, b = 0, len(words)  # J(a) >= target > J(b), up to non-monotone noise
    while b - a > 1:
        mid = (a + b) // 2
        if variant(mid)[1] >= target:
            a = mid
        else:
            b = mid
    # The bisection's neighbours: take the one nearest the target that lies in the bucket.
    options = [variant(k) for k in range(max(0, a - 2), min(len(words), b + 2) + 1)]
    options = [o for o in options if in_bucket(o[1])]
    return min(options, key=lambda o: abs(o[1] - target)) if options else None


def build_corpus(pairs_per_bucket: int, seed: int, ngram: int) -> tuple[list[dict], list[dict], dict]:
    """Documents (bases and variants) and the planted pairs, each with its exact s."""
    t0 = time.time()
    modules = stdlib_docstrings()
    rng = random.Random(seed)
    candidates = [chunk for docs in modules for chunk in chunk_module(docs)]
    rng.shuffle(candidates)  # so bases are not all from the alphabetically first modules
    need = pairs_per_bucket * len(BUCKETS)
    bases = dissimilar_bases(candidates, ngram, need)
    vocab = sorted({w for text in bases for w in text.split() if w.isalpha() and len(w) > 2})
    info = {"candidate_chunks": len(candidates), "bases_available": len(bases),
            "modules": len(modules)}
    if len(bases) < need:
        log(f"only {len(bases)} dissimilar bases for {need} pairs: fewer pairs per bucket")
    per_bucket = len(bases) // len(BUCKETS)
    docs, pairs, failed = [], [], 0
    for i, base in enumerate(bases[:per_bucket * len(BUCKETS)]):
        bucket = i % len(BUCKETS)  # interleaved, so every bucket gets bases of every kind
        lo, hi = BUCKETS[bucket]
        made = make_variant(base, lo, hi, rng, vocab, ngram)
        if made is None:
            failed += 1
            continue
        text, s = made
        base_id, var_id = f"b{i:05d}", f"v{i:05d}"
        docs.append({"id": base_id, "text": base})
        docs.append({"id": var_id, "text": text})
        pairs.append({"base": base_id, "variant": var_id, "bucket": bucket, "s": s})
    info.update(variant_failures=failed, build_s=round(time.time() - t0, 1))
    return docs, pairs, info


# --------------------------------------------------------------------------- theory and measurement

def p_detect(s: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard s share at least one of b bands of r rows."""
    return 1.0 - (1.0 - s ** rows) ** bands


def effective_band_rows(args) -> tuple[int, int]:
    # Newer kiln can derive b and r from a `threshold`; the theory must use what the stage uses.
    cfg = MinHashConfig(ngram=args.ngram, bands=args.bands, rows=args.rows, seed=args.seed)
    return cfg.band_rows() if callable(getattr(cfg, "band_rows", None)) else (cfg.bands, cfg.rows)


def verify_supported() -> bool:
    return any(f.name == "verify" for f in dataclasses.fields(MinHashConfig))


def run_minhash(spark, df, cfg: MinHashConfig) -> dict[str, str]:
    """id -> minhash_cluster after one run of the stage."""
    from kiln.curation.stage import run_stage

    result = run_stage(spark, MinHashDedupStage(cfg), df, None, log=lambda m: None)
    try:
        rows = result.result.select("id", MinHashDedupStage.CLUSTER).collect()
    finally:
        result.unpersist()
    return {r["id"]: r[MinHashDedupStage.CLUSTER] for r in rows}


def cluster_pairs(clusters: dict[str, str]) -> list[tuple[str, str]]:
    """Every pair of documents sharing a cluster (k members: k(k-1)/2 pairs)."""
    members: dict[str, list[str]] = defaultdict(list)
    for doc_id, cluster in clusters.items():
        members[cluster].append(doc_id)
    return [(ids[i], ids[j]) for ids in members.values() if len(ids) > 1
            for i in range(len(ids)) for j in range(i + 1, len(ids))]


def precision(merged: list[tuple[str, str]], sets: dict[str, set]) -> dict:
    true = sum(jaccard(sets[a], sets[b]) >= PRECISION_THRESHOLD for a, b in merged)
    # Two bases (or documents of two different bases) in one cluster: an unrelated merge.
    unrelated = sum(a[1:] != b[1:] for a, b in merged)
    return {"merged_pairs": len(merged), "true_pairs": true,
            "precision": true / len(merged) if merged else None, "unrelated_merges": unrelated}


def measure(spark, docs, pairs, args) -> dict:
    """Runs the stage `--repeats` times (seeds seed..seed+R-1), with and without
    verification where the stage has it, and pools the per-pair trials."""
    df = spark.createDataFrame(
        [(d["id"], f"https://bench.invalid/{d['id']}", d["text"], None) for d in docs],
        "id string, url string, text string, crawl_date timestamp").repartition(4).cache()
    df.count()
    sets = {d["id"]: shingle_set(d["text"], args.ngram) for d in docs}
    modes = {"without": {}}
    if verify_supported():
        modes["with"] = {"verify": True}
        if any(f.name == "verify_threshold" for f in dataclasses.fields(MinHashConfig)):
            modes["with"]["verify_threshold"] = PRECISION_THRESHOLD
    out = {}
    for mode, extra in modes.items():
        hits = [0] * len(pairs)
        merged_all, runs = [], []
        for rep in range(args.repeats):
            cfg = MinHashConfig(ngram=args.ngram, bands=args.bands, rows=args.rows, seed=args.seed + rep, **extra)
            t0 = time.time()
            clusters = run_minhash(spark, df, cfg)
            for i, p in enumerate(pairs):
                hits[i] += clusters[p["base"]] == clusters[p["variant"]]
            merged = cluster_pairs(clusters)
            merged_all += merged
            runs.append({"seed": cfg.seed, "seconds": round(time.time() - t0, 1), **precision(merged, sets)})
            log(f"{mode} verification, seed {cfg.seed}: {runs[-1]}")
        out[mode] = {"hits": hits, "runs": runs, "precision": precision(merged_all, sets), "settings": extra}
    df.unpersist()
    return out


def summarize(pairs, measured, args) -> list[dict]:
    """Per bucket: pairs, trials, mean s, measured rate (+ binomial SE), mean P(s)."""
    hits = measured["without"]["hits"]
    rows = []
    for b, (lo, hi) in enumerate(BUCKETS):
        idx = [i for i, p in enumerate(pairs) if p["bucket"] == b]
        trials = len(idx) * args.repeats
        probs = [p_detect(pairs[i]["s"], args.bands, args.rows) for i in idx]
        theory = sum(probs) / len(probs) if probs else float("nan")
        rate = sum(hits[i] for i in idx) / trials if trials else float("nan")
        # SE of the measured rate if the theory holds: the yardstick for the +/-0.05 target.
        se = math.sqrt(sum(q * (1 - q) for q in probs) * args.repeats) / trials if trials else float("nan")
        row = {"bucket": f"[{lo:.1f},{hi:.1f}{']' if hi >= 1.0 else ')'}", "pairs": len(idx), "trials": trials,
               "s_mean": sum(pairs[i]["s"] for i in idx) / len(idx) if idx else float("nan"),
               "s_min": min((pairs[i]["s"] for i in idx), default=float("nan")),
               "s_max": max((pairs[i]["s"] for i in idx), default=float("nan")),
               "measured_rate": rate, "theoretical_rate": theory, "abs_diff": abs(rate - theory),
               "se_theory": se}
        row["target"] = "PASS" if row["abs_diff"] <= TARGET else "MISS"
        if "with" in measured:
            wh = measured["with"]["hits"]
            row["measured_rate_verified"] = sum(wh[i] for i in idx) / trials if trials else float("nan")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report

def fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    verified = "with" in report["precision"]
    lines = [
        f"# MinHash dedup quality ({report['date']})", "",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM; Spark local[{cfg['cores']}]",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- MinHash: b={cfg['bands']} bands x r={cfg['rows']} rows, {cfg['ngram']}-gram word shingles, "
        f"seeds {cfg['seed']}..{cfg['seed'] + cfg['repeats'] - 1} ({cfg['repeats']} runs, trials pooled)",
        f"- corpus: {report['corpus']['documents']} documents = {report['corpus']['pairs']} planted pairs, each with "
        f"its own base (stdlib docstrings, {MIN_WORDS}-{MAX_WORDS} words, bases pairwise exact Jaccard "
        f"< {MAX_BASE_JACCARD}); s = exact Jaccard of kiln's shingle sets",
        f"- theory: mean over the bucket's pairs of P(s) = 1 - (1 - s^{cfg['rows']})^{cfg['bands']}; "
        f"target |measured - theory| <= {TARGET}; SE = binomial standard error of the measured rate if the "
        f"theory holds", "",
        "| s bucket | pairs | trials | mean s | measured rate | theoretical P(s) | abs diff | SE | target |"
        + (" rate (verified) |" if verified else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if verified else ""),
    ]
    for r in report["buckets"]:
        lines.append(f"| {r['bucket']} | {r['pairs']} | {r['trials']} | {fmt(r['s_mean'])} | {fmt(r['measured_rate'])} "
                     f"| {fmt(r['theoretical_rate'])} | {fmt(r['abs_diff'])} | {fmt(r['se_theory'])} | {r['target']} |"
                     + (f" {fmt(r['measured_rate_verified'])} |" if verified else ""))
    lines += ["", f"Precision: among all document pairs sharing a cluster (k members: k(k-1)/2 pairs, pooled over "
              f"the runs), the fraction with exact Jaccard >= {PRECISION_THRESHOLD} (the lowest planted s). "
              "Unrelated merges: pairs whose documents come from different bases.", "",
              "| verification | merged pairs | true (J >= 0.5) | precision | unrelated merges |",
              "|---|---:|---:|---:|---:|"]
    for mode in ("without", "with"):
        p = report["precision"].get(mode)
        if p is None:
            lines.append(f"| {mode} | n/a | n/a | n/a | n/a |")
        else:
            lines.append(f"| {mode} | {p['merged_pairs']} | {p['true_pairs']} | {fmt(p['precision'], 4)} "
                         f"| {p['unrelated_merges']} |")
    lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-per-bucket", type=int, default=100)
    ap.add_argument("--bands", type=int, default=MinHashConfig().bands)
    ap.add_argument("--rows", type=int, default=MinHashConfig().rows)
    ap.add_argument("--ngram", type=int, default=MinHashConfig().ngram)
    ap.add_argument("--seed", type=int, default=1, help="corpus RNG seed and first MinHash seed")
    ap.add_argument("--repeats", type=int, default=4, help="stage runs with MinHash seeds seed, seed+1, ...")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    effective = effective_band_rows(args)
    if effective != (args.bands, args.rows):
        log(f"MinHashConfig chose b, r = {effective} (its `threshold` option); the theory uses those")
        args.bands, args.rows = effective

    t0 = time.time()
    docs, pairs, corpus_info = build_corpus(args.pairs_per_bucket, args.seed, args.ngram)
    log(f"corpus: {len(docs)} documents, {len(pairs)} pairs, {corpus_info}")

    from kiln.curation.spark import get_spark

    spark = get_spark("kiln-bench", f"local[{args.cores}]")
    spark.sparkContext.setLogLevel("ERROR")
    try:
        measured = measure(spark, docs, pairs, args)
    finally:
        spark.stop()

    notes = []
    if "with" in measured:
        notes.append(f"Verification run with `verify_threshold={PRECISION_THRESHOLD}` (the lowest planted s) so "
                     "that it cannot remove planted pairs; the stage's default (0.7) would cut the two lower "
                     "buckets by design. Precision without verification is already 1 here unless bases collide: "
                     "the corpus has no documents between the unrelated bases (J < 0.2) and the planted pairs "
                     "(J >= 0.5), so it tests false merges of unrelated text, not near misses.")
    if "with" not in measured:
        notes.append("`MinHashConfig` has no `verify` field in this version of kiln: the stage has no exact-Jaccard "
                     "verification, so the 'with verification' precision (target >= 0.99) is not measured.")
    if len(pairs) < args.pairs_per_bucket * len(BUCKETS):
        notes.append(f"Asked for {args.pairs_per_bucket} pairs per bucket; the stdlib gave "
                     f"{corpus_info['bases_available']} dissimilar bases ({corpus_info['variant_failures']} "
                     "variants could not be placed in their bucket).")
    notes.append("A pair counts as detected when base and variant share `minhash_cluster`; clusters are connected "
                 "components, so a pair could also be joined through a third document (bases are dissimilar, so "
                 "this is rare: see unrelated merges).")
    buckets = summarize(pairs, measured, args)
    misses = [b["bucket"] for b in buckets if b["target"] == "MISS"]
    if misses:
        notes.append(f"Outside +/-{TARGET}: {', '.join(misses)} (compare abs diff with SE: a miss within ~2 SE is "
                     "sampling noise, not a bias).")

    report = {
        "benchmark": "dedup_quality", "date": date.today().isoformat(), "machine": machine(), "versions": versions('datasketch'),
        "config": {"bands": args.bands, "rows": args.rows, "ngram": args.ngram, "seed": args.seed,
                   "repeats": args.repeats, "cores": args.cores, "pairs_per_bucket_requested": args.pairs_per_bucket,
                   "precision_threshold": PRECISION_THRESHOLD, "max_base_jaccard": MAX_BASE_JACCARD,
                   "target_abs_diff": TARGET, "verify_supported": "with" in measured},
        "corpus": {"documents": len(docs), "pairs": len(pairs), **corpus_info},
        "buckets": buckets,
        "precision": {mode: {**m["precision"], "settings": m["settings"]} for mode, m in measured.items()},
        "runs": {mode: m["runs"] for mode, m in measured.items()},
        "pairs": [{**p, "detected_runs": {mode: m["hits"][i] for mode, m in measured.items()}}
                  for i, p in enumerate(pairs)],
        "notes": notes, "wall_s": round(time.time() - t0, 1),
    }
    md = render(report)
    print(md)
    write_results(args.out, "dedup_quality", report, md, os.cpu_count() or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

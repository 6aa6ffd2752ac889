"""``python -m kiln.demo --out data/sample.warc.gz [--seed 0] [--labels DIR] [--post DIR]``"""

from __future__ import annotations

import argparse
import sys
import time

from kiln.demo import build_labels, build_sample
from kiln.demo.post import build_post_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.demo",
        description="Build the deterministic Common-Crawl-like sample WARC used by `make demo`. "
                    "Pages wrap real text from this machine (Python stdlib docstrings and sources, "
                    "gettext catalogues, /usr/share/doc manuals) in site boilerplate, and include "
                    "duplicates, spam, logs, legacy encodings and broken records for every "
                    "curation stage to handle.")
    parser.add_argument("--out", default="data/sample.warc.gz",
                        help="output path of the gzip WARC (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed gives a byte-identical file (default: %(default)s)")
    parser.add_argument("--labels", metavar="DIR",
                        help="also write the demo's labelled training sets and evaluation sets to DIR "
                             "(built with seed + 1, so from other pages than the WARC's)")
    parser.add_argument("--post", metavar="DIR",
                        help="also write the demo's post-training data to DIR: SFT conversations (sft.jsonl), "
                             "preference pairs (prefs.jsonl) and held-out pairs (prefs_eval.jsonl) in TRL's "
                             "formats, answered from stdlib docstrings (built with seed + 1, like --labels)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = build_sample(args.out, seed=args.seed)
    elapsed = time.perf_counter() - start
    kinds = " ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int)
                     and k not in ("responses", "records", "bytes", "seed"))
    print(f"wrote {args.out}: {summary['responses']} responses, {summary['records']} records, "
          f"{summary['bytes'] / 1e6:.1f} MB in {elapsed:.1f}s ({kinds})")
    if args.labels:
        counts = build_labels(args.labels, seed=args.seed + 1)
        print(f"wrote {args.labels}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    if args.post:
        counts = build_post_data(args.post, seed=args.seed + 1)
        print(f"wrote {args.post}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

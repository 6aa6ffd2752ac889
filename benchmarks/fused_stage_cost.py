"""Where the fastText quality stage's CPU per document goes, layer by layer.

The same texts (a stage directory's docs/, e.g. the dedup output curation_scale.py
leaves), CPU seconds per document of:

1. the bare loop: `positive_probability` over the English texts, in this process;
2. `QualityStage.process` over the table's Arrow batches, in this process;
3. the fused group [quality, domain] (kiln.curation.fused.FusedGroup) over the same
   batches, in this process: the stage plus the group's counting and splitting;
4. the bare loop inside a Spark Python worker (local[1]);
5. the fused pipeline [quality, domain] on Spark, local[1] and local[2]: the quality
   stage's task_cpu_seconds from stats.json.

curation_scale.py's target compares (5) with (1); the layers between say where the
difference is. Needs the demo's models (make demo) and a docs directory:

    python benchmarks/fused_stage_cost.py --docs /tmp/kiln-curation-scale/fused_x16/07_dedup_lines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "out" / "demo" / "models"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def cpu(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` CPU times of fn()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def english_texts(table) -> list[str]:
    return [t for t, lang in zip(table.column("text").to_pylist(), table.column("lang").to_pylist())
            if t and not t.isspace() and lang == "en"]


def in_process(docs: Path) -> dict:
    import pyarrow.parquet as pq

    from kiln.curation.classify import (DomainConfig, DomainStage, QualityConfig, QualityStage, load_once,
                                        positive_probability)
    from kiln.curation.fused import FusedGroup
    from kiln.curation.langid import load_fasttext

    table = pq.read_table(docs / "docs")
    batches = table.to_batches(max_chunksize=512)
    quality = QualityStage(QualityConfig(model_path=str(MODELS / "quality.bin"), min_score=0.5))
    domain = DomainStage(DomainConfig(model_path=str(MODELS / "domain.bin")))
    model = load_once(quality._shipped, load_fasttext)
    texts = english_texts(table)
    DomainStage.metrics = lambda self: {}  # the group asks for Spark Columns otherwise; no Spark here
    group = FusedGroup([quality, domain], table.schema, tempfile.mkdtemp())
    group.with_metrics = [False, True]

    def fused():
        for _ in group.process_partition(iter(batches)):
            pass

    return {"docs": table.num_rows,
            "loop": cpu(lambda: positive_probability(model, texts, quality.cfg.positive_label,
                                                     quality.model.lowercase, quality.model.max_chars)),
            "process": cpu(lambda: [quality.process(b) for b in batches]),
            "fused group [quality, domain] in one process (both)": cpu(fused)}


def loop_in_worker(docs: Path) -> float:
    import pyarrow as pa

    from kiln.curation.spark import get_spark

    spark = get_spark("fused-stage-cost", "local[1,4]")
    model_path = str(MODELS / "quality.bin")

    def probe(batches):
        from kiln.curation.classify import positive_probability
        from kiln.curation.langid import load_fasttext

        texts = []
        for b in batches:
            texts += english_texts(b)
        model = load_fasttext(model_path)
        yield pa.RecordBatch.from_pylist([{"seconds": cpu(
            lambda: positive_probability(model, texts, "hq", True, 10_000))}])

    df = spark.read.parquet(str(docs / "docs")).select("text", "lang").repartition(1)
    seconds = df.mapInArrow(probe, "seconds double").collect()[0]["seconds"]
    spark.stop()
    return seconds


def pipeline(docs: Path, cores: int, work: Path) -> dict:
    recipe = work / "quality_domain.toml"
    text = (ROOT / "recipes" / "demo.toml").read_text()
    start = text.index("stages = [")
    end = text.index("]", start) + 1
    recipe.write_text(text[:start] + 'stages = ["quality", "domain"]' + text[end:])
    out = work / f"run_{cores}"
    env = dict(os.environ, KILN_SPARK_MASTER=f"local[{cores},4]")
    subprocess.run([sys.executable, "-m", "kiln.cli", "curate", "pipeline", str(recipe), "--input", str(docs),
                    "--output", str(out), "--force", "--overwrite"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    stats = json.loads((out / "01_quality" / "stats.json").read_text())
    return stats["extra"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", required=True, help="a stage directory with docs/ and lang (e.g. a dedup output)")
    args = p.parse_args()
    docs = Path(args.docs)
    measured = in_process(docs)
    n = measured.pop("docs")
    rows = [(k, v) for k, v in measured.items()]
    rows.append(("loop inside a Spark worker", loop_in_worker(docs)))
    with tempfile.TemporaryDirectory() as work:
        for cores in (1, 2):
            extra = pipeline(docs, cores, Path(work))
            rows.append((f"fused pipeline local[{cores}]: quality task_cpu_seconds", extra["task_cpu_seconds"]))
    print(f"{n:,} documents (quality scores the English ones; the loop's texts are those)")
    print(f"{'layer':<52} {'CPU s':>8} {'us/doc':>8}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds:>8.3f} {seconds / n * 1e6:>8.1f}")


if __name__ == "__main__":
    main()

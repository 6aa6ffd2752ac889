"""A small transformer that scores documents: the DistilRoBERTa role in Llama 3.

Llama 3 had Llama 2 label documents for quality, trained a DistilRoBERTa-sized
classifier on those labels and ran it over the whole corpus. This package is both
halves. `train_scorer` fine-tunes a local checkpoint, or trains a tiny model from
scratch with one of kiln's tokenizers, in a plain torch loop; it writes a
transformers checkpoint plus `kiln_scorer.json` (task, classes, validation
metrics). `Scorer` loads such a directory and scores texts in batches;
`ScorerStage` runs it inside Spark, one model per Python worker.

Two tasks: "regression" (float labels, e.g. a 0-5 quality grade; the score is the
model's output) and "classification" (string labels, softmax; the score is the
probability of `positive_label`, or the top class's probability for more than two
classes without one, which is what a domain classifier reports).
"""

from kiln.curation.scorer.model import (Scorer, ScorerTrainConfig, classification_metrics, read_meta,  # noqa: F401
                                        regression_metrics, resolve_positive_label, scorer_info, split_rows,
                                        train_scorer, train_scorer_from_files)
from kiln.curation.scorer.stage import ScorerConfig, ScorerStage, worker_scorer  # noqa: F401

"""`kiln average MODEL_DIR MODEL_DIR ... --out DIR [--weights W W ...]`: average exported models.

    kiln average out/run-a/export out/run-b/export --out out/avg                  uniform
    kiln average out/run-a/export out/run-b/export --out out/avg --weights 1 3    0.25 a + 0.75 b
"""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = ("Average Hugging Face model directories, uniformly or with weights, as Llama 3 averages models "
               "from runs with different data or hyperparameters. The models must share config.json and every "
               "tensor's name, shape and dtype (causal LMs and reward models alike). Weights are read from "
               "safetensors only (model.safetensors, or the shards of model.safetensors.index.json), averaged in "
               "float64 and written in each tensor's own dtype to DIR/model.safetensors, beside the first "
               "model's config, generation config and tokenizer files, and kiln_average.json (the inputs, the "
               "sha256 of their weight files and the normalised weights). DIR must be new, empty or a previous "
               "average; it is written under a temporary name and renamed when complete.")


def add_parser(sub) -> None:
    p = sub.add_parser("average", help="average exported models (uniform or weighted): Llama 3's model averaging",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # keeps the examples' columns
    p.add_argument("models", nargs="+", metavar="MODEL_DIR",
                   help="Hugging Face model directories with safetensors weights (at least two)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one positive weight per model, in order, scaled to sum to 1 (default: uniform)")


def run(args) -> int:
    from kiln.training.average import average_models

    average_models(args.models, args.out, args.weights)
    return 0

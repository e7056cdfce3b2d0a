# Parity: the two commands a new user needs are `make demo` and `make test`.
# Both run `make setup` first; setup is idempotent (a stamp tracks pyproject.toml).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.parity-installed
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean verify-movielens

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[train,test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m parity.demo --out $(DEMO_OUT)

bench: setup
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.json -p no:cacheprovider
	$(PY) -m bench.report bench/results/latest.json bench/RESULTS.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .benchmarks

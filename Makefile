# `make demo` and `make test` do all set-up on a fresh machine: they create .venv,
# install ftsearch with its dev extras, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Each demo run is a new experiment (runs/demo-<time>), so `make demo` can be repeated.
demo: $(STAMP)
	$(BIN)/ftsearch run configs/demo.yaml \
		--name demo-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(BIN)/ruff check search trainables tests benchmarks

test: lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs

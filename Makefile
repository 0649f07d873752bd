# `make demo` and `make test` do all set-up on a fresh machine: they create .venv,
# install ftsearch with its dev extras, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-gpu clean

# INSTALLER=uv (default) installs with uv, configured from pip's own settings (index mirrors,
# local wheels, version caps; tools/uv_install.py): 40 % of pip's time, most of it torch's.
# INSTALLER=pip installs with pip alone.
INSTALLER ?= uv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(BIN)/pip install -q -e '.[dev]'
else ifeq ($(INSTALLER),uv)
	$(BIN)/pip install -q 'uv>=0.5'
	$(BIN)/python tools/uv_install.py $(BIN)/python -e '.[dev]'
else
	$(error INSTALLER must be uv or pip, not '$(INSTALLER)')
endif
	touch $(STAMP)

# Each demo run is a new experiment (runs/demo-<time>), so `make demo` can be repeated;
# runs/demo links the newest finished one (the README's snippets read it).
# DEMO_ARGS: extra `ftsearch run` arguments (`--set KEY=VALUE`...), e.g. a smaller demo.
demo: $(STAMP)
	@name=demo-$$(date +%Y%m%d-%H%M%S) && \
		$(BIN)/ftsearch run configs/demo.yaml --name $$name $(DEMO_ARGS) && \
		if [ -e runs/demo ] && [ ! -L runs/demo ]; then \
			echo "runs/demo exists and is not a link, so it was left as it is (newest: runs/$$name)"; \
		else ln -sfn $$name runs/demo; fi

lint: $(STAMP)
	$(BIN)/ruff check search trainables tests benchmarks tools

test: lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs

# On a CUDA machine: every GPU figure and check (benchmarks/device/gpu_session.sh, each step
# under its own time limit; BUDGET_S caps the whole run), then the figures into BENCHMARKS.md.
bench-gpu: $(STAMP)
	@out=runs/bench-gpu-$$(date +%Y%m%d-%H%M%S) && \
		OUT=$$out PYTHON=$(BIN)/python bash benchmarks/device/gpu_session.sh && \
		$(BIN)/python -m benchmarks.device.splice $$out/results.jsonl

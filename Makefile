# make install: .venv with torch first (the CPU wheel by default), then ptqd editable + dev tools.
# A GPU user picks another torch: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url URL"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptqd-installed

.PHONY: install demo test lint clean

install: $(STAMP)

# torch goes in before anything that depends on it, so pip never resolves `torch` itself
# (which would pull the multi-GB CUDA build on a machine that has the CPU wheel).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,report]"
	touch $@

demo: install
	$(BIN)/export-trt --bits 4 --steps 50 --output ptqd-out --force

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check ptqd tests benchmarks

clean:
	rm -rf $(VENV) ptqd-out .pytest_cache

# make install: .venv with torch first (the CPU wheel by default), then ptqd editable + dev tools.
# A GPU user picks another torch: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url URL"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptqd-installed
# The CPU Triton server (nvidia-pytriton's bundled tritonserver) runs from its own environment:
# its Python backend answers empty responses under NumPy 2, and it needs only numpy, onnxruntime
# and (for text-conditioned models' prompts) the tokenizers library.
TRITON_ENV ?= .venv-triton
TRITON_STAMP := $(TRITON_ENV)/.ptqd-installed
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0

.PHONY: install triton-env demo test lint clean

install: $(STAMP)

triton-env: $(TRITON_STAMP)

# torch goes in before anything that depends on it, so pip never resolves `torch` itself
# (which would pull the multi-GB CUDA build on a machine that has the CPU wheel).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: install
	$(BIN)/export-trt --bits 4 --steps 50 --output ptqd-out --force

# onnxruntime and tokenizers pinned to the versions ptqd itself runs, so server and local samples
# are bit-identical.
$(TRITON_STAMP): $(STAMP)
	test -x $(TRITON_ENV)/bin/python || $(PYTHON) -m venv $(TRITON_ENV)
	$(TRITON_ENV)/bin/python -m pip install -q --disable-pip-version-check "numpy<2" "$(PYTRITON_SPEC)" \
		"onnxruntime==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')" \
		"tokenizers==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("tokenizers"))')"
	touch $@

test: install triton-env
	PTQD_TRITON_ENV=$(CURDIR)/$(TRITON_ENV) $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check ptqd tests benchmarks

clean:
	rm -rf $(VENV) $(TRITON_ENV) ptqd-out .pytest_cache

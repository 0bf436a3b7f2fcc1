# The README's commands. Each sets up .venv from nothing (pinned requirements, then the
# package and its C++/CUDA extension) and is fast the second time: every step is a file
# target that only reruns when its inputs change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the CUDA toolkit: the nvcc on PATH may be a wrapper from which torch derives a wrong root
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
export PATH := $(abspath $(VENV))/bin:$(PATH)

DEPS := $(VENV)/.deps-installed
PKG := $(VENV)/.package-installed
EXT := build/.extension-built
# the GPU machine's Triton, beside ours, for the compile gate: its kernels must not spill there either
GPU_TRITON_VERSION := 3.6.0
GPU_TRITON := build/triton-$(GPU_TRITON_VERSION)
# NVIDIA CuTe's headers (nvidia-cutlass wheel): the warp emulator's fragment layouts are checked against them
CUTLASS_VERSION := 4.2.0.0
CUTLASS := build/cutlass-$(CUTLASS_VERSION)
EXT_SOURCES := $(shell find csrc -type f) setup.py fused_attn/_build.py

.PHONY: setup demo test test-fast lint format gate bench gpu-suite clean

setup: $(EXT)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# registers the package (editable) and the `fused-attn` command; the extension is built below
$(PKG): $(DEPS) setup.py pyproject.toml
	FUSED_ATTN_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# fused_attn/_C: ninja rebuilds only what changed
$(EXT): $(PKG) $(EXT_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	@mkdir -p build && touch $@

$(GPU_TRITON)/.installed: | $(PY)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_TRITON) triton==$(GPU_TRITON_VERSION)
	touch $@

$(CUTLASS)/.installed: | $(PY)
	$(PY) -m pip install --quiet --no-deps --target $(CUTLASS) nvidia-cutlass==$(CUTLASS_VERSION)
	touch $@

demo: setup
	$(VENV)/bin/fused-attn demo

CXX_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort)

# pyflakes and pycodestyle (pyproject.toml [tool.ruff]) and csrc's clang-format style
# (.clang-format): seconds, so make test runs it first
lint: $(DEPS)
	$(VENV)/bin/ruff check fused_attn tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# applies the C++/CUDA style that lint checks
format: $(DEPS)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# the timed tests check a wall-clock budget, so they run alone once the parallel run is done
test: lint setup $(GPU_TRITON)/.installed $(CUTLASS)/.installed
	$(PY) -m pytest -n 2 --dist worksteal -m "not timed" --durations=25 tests
	$(PY) -m pytest -m timed tests

# everything but the GPU compile gate
test-fast: setup
	$(PY) -m pytest -n 2 -m "not gate and not timed" tests

gate: setup $(GPU_TRITON)/.installed
	$(PY) -m fused_attn.tools.gate
	PYTHONPATH=$(GPU_TRITON) $(PY) -m fused_attn.tools.gate --triton

bench: setup
	$(VENV)/bin/fused-attn bench

gpu-suite:
	bash benchmarks/gpu_suite.sh

clean:
	rm -rf build fused_attn/_C*.so

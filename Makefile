# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# Where `make lock` finds PyTorch's CPU build: a page or folder of wheels (pip's --find-links).
TORCH_CPU_WHEELS ?= https://download.pytorch.org/whl/cpu/torch/

.PHONY: install demo test lint lock check-latest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Everything from the lock, hash-checked; then the project itself, built with the locked setuptools.
install: $(BIN)/python
	$(BIN)/python -m pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q --require-hashes -r locks/cpu.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .

demo: install
	$(BIN)/smartdiff demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest, not `python -m pytest`: the latter puts the checkout's root on sys.path, where its folder
# `kernels/` would shadow the installed distribution of that name.
test: install lint
	$(BIN)/pytest

# The locks: locks/cpu.txt (this environment) and locks/gpu.txt (the worker image), with hashes.
lock: $(BIN)/python
	$(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml locks/cpu.in --extra test --extra demo --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_CPU_WHEELS) \
		--custom-compile-command "make lock" -o locks/cpu.txt
	$(BIN)/uv pip compile pyproject.toml locks/gpu.in --generate-hashes \
		--python-version 3.12 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -o locks/gpu.txt

# Not part of CI: the newest releases pyproject.toml allows, in a throwaway environment, through the
# whole suite, so the next drift is found before users find it. torch stays at the CPU build: a newer
# release would be a CUDA build of several GB.
check-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager ".[test,demo]"
	.venv-latest/bin/pip list --format=freeze
	.venv-latest/bin/pytest

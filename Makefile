# Two commands do all set-up on a fresh machine (see README):
#   make demo   — create .venv, install edgecl with its training + runtime extras, run `edgecl demo`
#   make test   — the same set-up plus test tools, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch is pinned to the CPU wheel: an unpinned `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# torchvision is pinned to the release that pairs with that torch (model definitions for --arch torchvision.models:…)
TORCHVISION ?= torchvision==0.28.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml edgecl/runtime/_maskfill.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" "$(TORCHVISION)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[train,runtime,vision,dev]"
	touch $@

demo: setup
	$(BIN)/edgecl demo --out demo-out

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache

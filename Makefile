# Two commands a newcomer needs:  `make demo` (set up, then train the quickstart) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup ffcv kernels demo test test-fast wheel-check clean

setup: $(VENV)/.installed

# Torch first, so nothing else pulls a different build of it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# FFCV (the fast .beton loaders) compiles against system OpenCV and libjpeg-turbo. Best effort: where
# apt-get is not usable (no root), everything else still works and .beton paths say what to install.
ffcv: setup
	@bash scripts/install-ffcv.sh $(PY)

# The CPU attention kernel (tntcli/backends/kernels.py) is built on first use: 35-45 s on 2 cores, once per machine.
# The tests build it here, up front, so that no test pays for it at random; without a compiler it warns and skips.
kernels: $(VENV)/.kernels

$(VENV)/.kernels: $(VENV)/.installed tntcli/backends/kernels.py tntcli/backends/csrc/tiny_attention.cpp
	$(PY) -c "from tntcli.backends import kernels; kernels.available()"
	touch $@

demo: setup
	$(VENV)/bin/tnt train --recipe quickstart

test: setup ffcv kernels
	$(PY) -m pytest -q

test-fast: setup kernels
	$(PY) -m pytest -q -m "not slow"

# What `pip install .` gives, away from the checkout: build the wheel, install it into a fresh venv (torch first,
# as in setup), train the quickstart for one epoch in an empty folder, and check that a named dataset picks its
# shipped transfer recipe and a recipe name that does not exist is an error.
WHEEL_VENV ?= build/wheel-venv
wheel-check: setup
	rm -rf build/wheel dist $(WHEEL_VENV)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/wheel .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q $(TORCH)
	$(WHEEL_VENV)/bin/python -m pip install -q build/wheel/tntcli-*.whl
	bash scripts/wheel-check.sh $(abspath $(WHEEL_VENV))

clean:
	rm -rf $(VENV) .pytest_cache build

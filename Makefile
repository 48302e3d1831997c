# Two commands a newcomer needs:  `make demo` (set up, then train the quickstart) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup ffcv kernels demo test test-fast clean

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
kernels: setup
	$(PY) -c "from tntcli.backends import kernels; kernels.available()"

demo: setup
	$(VENV)/bin/tnt train --recipe quickstart

test: setup ffcv kernels
	$(PY) -m pytest -q

test-fast: setup kernels
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache

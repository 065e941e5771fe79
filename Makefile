# The two commands of a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if it is missing and install argen into it.
# CPU machines pin torch==2.13.0 through constraints-cpu.txt (an unpinned torch pulls a multi-GB CUDA build; the
# pin finds a CPU wheel on this project's machines, elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index);
# on a GPU machine run `make install CONSTRAINTS=` and install the torch build for your CUDA first.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PYTEST_ARGS ?=

.PHONY: install demo test test-all clean

$(VENV)/.argen-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(CONSTRAINTS),$(PY) -m pip install -q $(PIP_C) torch,)
	$(PY) -m pip install -q $(PIP_C) -e '.[dev]'
	touch $@

install: $(VENV)/.argen-installed

demo: install
	$(VENV)/bin/argen demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache

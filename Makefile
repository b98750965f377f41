# The two commands of README.md, on a bare machine with Python >= 3.10 and a C++ compiler:
#
#   make demo     train on scikit-learn's digits and draw theory against experiment (demo/)
#   make test     run the test suite
#
# Each creates .venv on first use, installs torch (a CPU build by default) and nm_optim with its
# test and demo extras (building nm_optim._C with CMake), then runs. Later runs reuse .venv and
# rebuild only when the package's build inputs changed. Variables:
#   PYTHON=python3.12            the interpreter that creates the environment
#   TORCH="torch==2.13.0"        the torch requirement pip installs first (any pip arguments:
#                                e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu128")
#   VENV=.venv                   where the environment lives
#   DEMO_OUT=demo/               the demo's output folder
#   PYTEST_ARGS="-x -k stats"    extra pytest arguments
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
DEMO_OUT ?= demo/
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
# Installed when this file is newer than every build input of the package.
STAMP := $(VENV)/.nm_optim-installed
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test env clean-env

demo: $(STAMP)
	$(VENV)/bin/nm-optim demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

env: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first: a bare `torch` requirement of the package could otherwise pull a CUDA build of
# several GB on a CPU machine.
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean-env:
	rm -rf $(VENV)

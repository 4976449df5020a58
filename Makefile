# fbsemlib: two commands do all set-up on a fresh machine.
#   make test            install into .venv and run every test
#   make book            install into .venv and build the book (PROFILE=cpu by default)
#   make parallelproj    build parallelproj from source into .venv (no conda; about a minute):
#                        PARALLELPROJ_SRC=../shared/vendor (archives or source trees), else a git clone
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
JOBS ?= 2
STAMP := $(VENV)/.installed
PARALLELPROJ_SRC ?=
PP_STAMP := $(VENV)/.parallelproj

.PHONY: install test test-fast book book-run book-html clean bench parallelproj

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-lock.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# rebuilt when the script or the given sources change; see tools/build_parallelproj.sh
$(PP_STAMP): tools/build_parallelproj.sh $(if $(PARALLELPROJ_SRC),$(wildcard $(PARALLELPROJ_SRC) $(PARALLELPROJ_SRC)/*.tar.gz)) | $(STAMP)
	VENV=$(VENV) PARALLELPROJ_SRC=$(PARALLELPROJ_SRC) JOBS=$(JOBS) bash tools/build_parallelproj.sh
	touch $(PP_STAMP)

parallelproj: $(PP_STAMP)

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -x -m "not slow" tests

book: install
	$(VENV)/bin/fbsem book build --profile $(PROFILE) --jobs $(JOBS)

bench: install
	$(VENV)/bin/fbsem bench all

clean:
	rm -rf book/_build book/_executed

# fbsemlib: two commands do all set-up on a fresh machine.
#   make test            install into .venv and run every test
#   make book            install into .venv and build the book (PROFILE=cpu by default)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
JOBS ?= 2
STAMP := $(VENV)/.installed

.PHONY: install test test-fast book book-run book-html clean bench

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-lock.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

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

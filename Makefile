# Two commands for a fresh machine: `make run` (the demo) and `make test` (the whole test suite).
PYTHON ?= python3
VENV := .venv
DB ?= demo.sqlite3

.PHONY: run test quick-test bench clean

run:  ## create the demo database, print its token and a curl command, serve on 127.0.0.1:8000
	$(PYTHON) -m timeslot_export demo --db $(DB)
	$(PYTHON) -m timeslot_export serve --db $(DB)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

test: $(VENV)/.installed  ## every test, load, fault and fuzz tests included
	$(VENV)/bin/python -m pytest

quick-test: $(VENV)/.installed  ## the tests without the slow ones
	$(VENV)/bin/python -m pytest -m 'not slow'

bench:  ## the performance targets of SPEC §7, as ratios measured in one run
	$(PYTHON) bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-data $(DB) $(DB)-wal $(DB)-shm

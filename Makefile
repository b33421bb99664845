# meshpost: `make demo` and `make test` work on a fresh machine; each creates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test test-fast lint bench bench-brokers install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(BENCH_STAMP): $(TEST_STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshpost demo

# The suite runs on TEST_WORKERS pytest-xdist workers: its integration tests mostly wait on node
# processes and I/O, so two workers roughly halve the wall time even on 2 cores. worksteal lets
# an idle worker take queued tests from a busy one. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST_ARGS := -q -n $(TEST_WORKERS) --dist worksteal

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not faults"

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(BENCH_STAMP) bench-brokers
	$(VENV)/bin/meshpost bench

# Mosquitto (Debian) for the broker-anchors scenario; without it that scenario is skipped.
bench-brokers:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { apt-get install -y -q mosquitto >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q mosquitto >/dev/null 2>&1) || \
	    echo "mosquitto not installed: broker-anchors will skip it"; }

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

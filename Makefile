# The README's two commands are `make run` and `make test`; both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run services test test-unit screenshots lint bench bench-batch bench-fairness clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Everything on 127.0.0.1 unless `make run HOST=0.0.0.0`; Flower behind basic auth; the demo
# key and Flower's password kept in .run/ (mode 600) and reused (scripts/run.sh).
run: install
	bash scripts/run.sh

# A private Postgres and Redis in .run/services until Ctrl-C; prints their URLs as exports.
services: install
	$(BIN)/chatjobs dev-services

test: install browser
	$(BIN)/pytest -q

# Headless Chromium for the browser tests (tests/integration/test_docs_offline.py and those on
# tests/browser.py, which Playwright from the dev extra drives): Debian's package where we are
# root with apt-get (the package lists fetched only if the first try fails). Without it those
# tests skip, naming the command.
.PHONY: browser
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { $(APT_INSTALL) || { apt-get update -qq >/dev/null 2>&1 && $(APT_INSTALL); }; }; } || \
	echo "make browser: no chromium installed; the browser tests will skip"

APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1

# The README's console screenshots (docs/screenshots/), taken by the browser tests.
screenshots: install browser
	CHATJOBS_SCREENSHOTS=docs $(BIN)/pytest -q tests/integration/test_ui_browser.py \
	  tests/integration/test_ui_batches.py tests/integration/test_ui_schedules.py \
	  tests/integration/test_ui_usage.py

test-unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Per-job cost (docs/benchmarks.md, "Overhead" and "Dispatch from Postgres"): jobs submitted
# while workers run, the drain of 10,000 queued jobs, and POST /v1/jobs; about 5 minutes.
bench: install
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/overhead.py --drain --jobs 10000
	$(BIN)/python bench/ingest.py --seconds 8 --concurrency 1,8,32,64

# Fairness and priority (docs/benchmarks.md, "Dispatch from Postgres"): a big tenant and small
# ones at 3,000 RPM, weights 2:1 (equal and unequal job sizes), a priority-50 job over a
# backlog of 5,000; about 15 minutes.
bench-fairness: install
	$(BIN)/python bench/fairness.py small-tenants
	$(BIN)/python bench/fairness.py weights
	$(BIN)/python bench/fairness.py weights --light-prompt 800 --heavy 6000 --light 2000
	$(BIN)/python bench/priority.py --upstream limited
	$(BIN)/python bench/priority.py --upstream unlimited

# Batches (docs/benchmarks.md, "Batches"): ingest of 50,000 and 5,000 lines, then 10,000 lines
# end to end against `make run`'s simulator and a stricter one; about 12 minutes.
bench-batch: install
	$(BIN)/python bench/batch_ingest.py --lines 50000,5000
	$(BIN)/python bench/batch_e2e.py --lines 10000
	$(BIN)/python bench/batch_e2e.py --lines 10000 --upstream strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

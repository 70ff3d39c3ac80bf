# homeseek developer commands. `make install` once, then `make run` / `make test`.
VENV ?= .venv
PY := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
PROMPT ?= Hello
MODEL ?= tiny
PORT ?= 8000
URL ?= http://127.0.0.1:$(PORT)

.PHONY: install run serve chat test test-gpu lint format

install:  ## virtualenv + CPU torch wheel + homeseek with test extras
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e '.[test]'

run:  ## generate from the built-in tiny model (or MODEL=/path/to/checkpoint)
	$(PY) -m homeseek generate --model $(MODEL) --threads 1 "$(PROMPT)"

serve:  ## OpenAI-compatible server on 127.0.0.1:$(PORT) (MODEL=tiny or a checkpoint dir)
	$(PY) -m homeseek serve --model $(MODEL) --port $(PORT) $(SERVE_ARGS)

chat:  ## interactive chat against `make serve` (URL=...), or in-process: make chat CHAT_ARGS="--model tiny"
	$(PY) -m homeseek chat --url $(URL) $(CHAT_ARGS)

test:  ## CPU test suite (GPU tests are skipped without CUDA)
	$(PY) -m pytest -q -m "not gpu"

test-gpu:  ## GPU tests only (needs CUDA)
	$(PY) -m pytest -q -m gpu

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# homeseek developer commands. From a fresh clone `make run` and `make test` set everything up
# themselves (once): a virtualenv in $(VENV) with torch and homeseek[test] installed editable.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY ?= $(VENV)/bin/python
PROMPT ?= Hello
MODEL ?= tiny
PORT ?= 8000
URL ?= http://127.0.0.1:$(PORT)

# The set-up is a file target: done once, redone when pyproject.toml changes (new dependencies),
# retried when it failed halfway (the stamp is written last). `make test PY=python3` uses an
# interpreter that already has everything and skips the set-up.
STAMP := $(VENV)/.installed
SETUP := $(if $(filter command line environment,$(origin PY)),,$(STAMP))

.PHONY: install run serve chat test test-gpu lint format bench

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): $(TORCH), then homeseek[test] (editable); once, ~2 minutes"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

install: $(SETUP)  ## only the set-up that run / test do on their own

run: $(SETUP)  ## generate from the built-in tiny model (or MODEL=/path/to/checkpoint)
	$(PY) -m homeseek generate --model $(MODEL) --threads 1 "$(PROMPT)"

serve: $(SETUP)  ## OpenAI-compatible server on 127.0.0.1:$(PORT) (MODEL=tiny or a checkpoint dir)
	$(PY) -m homeseek serve --model $(MODEL) --port $(PORT) $(SERVE_ARGS)

chat: $(SETUP)  ## chat against `make serve` (URL=...), or in-process: make chat CHAT_ARGS="--model tiny"
	$(PY) -m homeseek chat --url $(URL) $(CHAT_ARGS)

test: $(SETUP)  ## CPU test suite (GPU tests are skipped without CUDA)
	$(PY) -m pytest -q -m "not gpu"

bench: $(SETUP)  ## end-to-end speed vs measured ceilings (full size on CUDA, tiny on CPU)
	$(PY) -m homeseek bench $(BENCH_ARGS)

test-gpu: $(SETUP)  ## GPU tests only (needs CUDA)
	$(PY) -m pytest -q -m gpu

lint: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(SETUP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

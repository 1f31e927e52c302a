# rhaas: `make test` runs every test; `make demo` shows the main job on a local lab.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: venv test test-fast bench demo completions clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -ra

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not lab"

bench: venv
	RHAAS_BENCH_REPEAT=$${RHAAS_BENCH_REPEAT:-3} $(BIN)/python bench/run.py

demo: venv
	$(BIN)/python -m rhaas.lab.demo

completions: venv
	for sh in bash zsh fish; do $(BIN)/rhaas completion $$sh > completions/rhaas.$$sh; done

clean:
	rm -rf build dist *.egg-info .pytest_cache

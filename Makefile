# rhaas: `make test` runs every test; `make demo` shows the main job on a local lab.
# Both set up what they need first: the Debian packages in .ci/apt-packages.txt (`make deps`),
# then a virtual environment in .venv with rhaas and the extra they need (test, or lab).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: deps venv test test-fast lint bench demo completions clean

# Debian packages: installed when missing if we are root; otherwise the one command to run.
deps:
	@missing=""; \
	for p in $$(grep -v '^[[:space:]]*#' .ci/apt-packages.txt); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q ' installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "sudo apt-get install -y$$missing" >&2; \
		exit 1; \
	fi

# .venv with rhaas and one extra: $(VENV)/.installed-test (pytest, ruff, the lab) or -lab
$(VENV)/.installed-%: pyproject.toml | deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$*]'
	touch $@

.PRECIOUS: $(VENV)/.installed-%

venv: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -ra

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -ra -m "not lab"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check rhaas tests bench

bench: $(VENV)/.installed-lab
	RHAAS_BENCH_REPEAT=$${RHAAS_BENCH_REPEAT:-3} $(BIN)/python bench/run.py

demo: $(VENV)/.installed-lab
	$(BIN)/python -m rhaas.lab.demo

completions: $(VENV)/.installed-lab
	for sh in bash zsh fish; do $(BIN)/rhaas completion $$sh > completions/rhaas.$$sh; done

clean:
	rm -rf build dist *.egg-info .pytest_cache

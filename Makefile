# Two commands for a newcomer on a fresh machine with Python 3.11:
#   make demo   -- set up .venv and run the embedded demo
#   make test   -- set up .venv and run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist=loadfile -q

lint: $(STAMP)
	$(VENV)/bin/ruff check micle_jax configs tests data_builders

clean:
	rm -rf $(VENV) .pytest_cache

# Two commands for a newcomer on a fresh machine with Python 3.11:
#   make demo   -- set up .venv and run the embedded demo
#   make test   -- set up .venv and run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The runtime stack (requirements.txt: what the commands and the demo run) and, for `make test`,
# the test stack on top of it (requirements-test.txt: pytest, PyTorch for the export's tests,
# the notebooks' kernel).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv test-venv native test demo demo-data derm-data derm-study lint clean torchvision-env

venv: $(STAMP)
test-venv: $(TEST_STAMP)

$(STAMP): requirements.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-notebooks.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip check
	touch $(TEST_STAMP)

# The CPU's convolutions by oneDNN (micle_jax/models/native_conv.py): oneDNN's library and headers
# come from PyPI (micle_jax/models/native/build.py says which and why); needs a C++ compiler and
# Linux on x86-64. Elsewhere XLA's convolutions are used, with the same results to float rounding,
# at about half the speed.
CXX ?= g++
NATIVE := micle_jax/models/native
NATIVE_LIB := $(NATIVE)/libmicle_onednn.so
native: $(STAMP)
	@if [ $(NATIVE_LIB) -nt $(NATIVE)/onednn_conv.cc ] && [ $(NATIVE_LIB) -nt $(NATIVE)/build.py ] \
	  && [ $(NATIVE_LIB) -nt $(STAMP) ]; then :; else $(PY) $(NATIVE)/build.py --cxx=$(CXX); fi

test: native $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist=loadfile -q --durations=25

# Real torchvision and timm in a venv of their own, for the export's and the import's tests
# against them (the tests skip without it; .ci/run builds it). See requirements-torchvision.txt
# for why it is separate.
TV_VENV := .venv-torchvision
torchvision-env: $(TV_VENV)/.installed

$(TV_VENV)/.installed: requirements-torchvision.txt
	test -x $(TV_VENV)/bin/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/python -m pip install -q -r requirements-torchvision.txt
	$(TV_VENV)/bin/python -m pip check
	touch $@

DATA := data

# Synthetic CheXpert- and NIH-style data in the real download layouts, built with the real TFDS
# builders; written once per generator version (data_builders/synthetic/demo.py).
demo-data: $(STAMP)
	$(PY) -m data_builders.synthetic.demo --data=$(DATA) --layouts=chexpert,nih

# HAM10000-style data, for the dermatology and ImageNet-stand-in demo configs, and synthetic
# teledermatology cases (a generic case CSV with an external clinic) for the dermatology study.
derm-data: $(STAMP)
	$(PY) -m data_builders.synthetic.demo --data=$(DATA) --layouts=ham10000,teledermatology

# The dermatology study (configs/study_derm.py:demo): MICLe where the paper uses it.
derm-study: derm-data native
	$(PY) -m micle_jax.study --config=configs/study_derm.py:demo

# The study on the synthetic data: SimCLR and MICLe pretraining at equal budgets, fine-tuning of
# scratch, SimCLR and MICLe at 5% and 100% of the labels, evaluation in distribution and on the
# NIH-style shift set, the table with paired differences, and the label-efficiency plot.
demo: demo-data native
	$(PY) -m micle_jax.study --config=configs/study_cxr.py:demo
	@echo "Demo finished: workdirs/study_demo (TensorBoard: $(VENV)/bin/tensorboard --logdir workdirs)"

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check micle_jax configs tests data_builders
	shellcheck launch/*.sh

clean:
	rm -rf $(VENV) $(TV_VENV) .pytest_cache $(NATIVE_LIB) $(NATIVE)/libdnnl.so.3 build/onednn

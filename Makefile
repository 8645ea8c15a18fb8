# Two commands for a newcomer on a fresh machine with Python 3.11:
#   make demo   -- set up .venv and run the embedded demo
#   make test   -- set up .venv and run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo demo-data lint clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt requirements-notebooks.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist=loadfile -q

DATA := data
TFDS := $(DATA)/tensorflow_datasets
DEMO_WORKDIR ?= workdirs/cxr_demo
FT_ROOT ?= workdirs/finetune_demo

# Synthetic data in the real download layouts, built with the real TFDS builders (idempotent).
demo-data: $(STAMP)
	test -f $(DATA)/manual/chexpert/CheXpert-v1.0-small/train.csv || \
	  $(PY) -m data_builders.synthetic --layout=chexpert --out=$(DATA)/manual/chexpert --seed=0
	$(PY) -m data_builders.build chexpert_micle --manual_dir=$(DATA)/manual/chexpert --data_dir=$(TFDS)
	test -f $(DATA)/manual/ham10000/HAM10000_metadata.csv || \
	  $(PY) -m data_builders.synthetic --layout=ham10000 --out=$(DATA)/manual/ham10000 --seed=0
	$(PY) -m data_builders.build derm/ham10000_cases --manual_dir=$(DATA)/manual/ham10000 --data_dir=$(TFDS)
	$(PY) -m data_builders.build derm/ham10000_images --manual_dir=$(DATA)/manual/ham10000 --data_dir=$(TFDS)
	test -f $(DATA)/manual/nih/Data_Entry_2017_v2020.csv || \
	  $(PY) -m data_builders.synthetic --layout=nih --out=$(DATA)/manual/nih --seed=0
	$(PY) -m data_builders.build nih_cxr14/images --manual_dir=$(DATA)/manual/nih --data_dir=$(TFDS)

# MICLe pretraining of a small ResNet on synthetic CheXpert-style data, then fine-tuning from
# scratch and from that checkpoint at two label fractions, evaluated in distribution and on
# synthetic NIH ChestX-ray14 (shift); prints a table and writes the label-efficiency plot.
demo: demo-data
	$(PY) -m micle_jax.main --config=configs/cxr.py:demo --workdir=$(DEMO_WORKDIR)
	$(PY) -m micle_jax.sweep run --config=configs/finetune_cxr.py:demo --root=$(FT_ROOT) \
	  --fractions=0.25,1.0 --seeds=0 --inits=scratch,micle=$(DEMO_WORKDIR)
	$(PY) -m micle_jax.sweep collect --root=$(FT_ROOT) --plot
	@echo "Demo finished. Pretraining: $(DEMO_WORKDIR); fine-tuning runs and results: $(FT_ROOT)"
	@echo "  $(VENV)/bin/tensorboard --logdir workdirs"

lint: $(STAMP)
	$(VENV)/bin/ruff check micle_jax configs tests data_builders
	shellcheck launch/*.sh

clean:
	rm -rf $(VENV) .pytest_cache

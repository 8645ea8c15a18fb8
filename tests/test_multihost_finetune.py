"""Fine-tuning in 2 processes x 4 CPU devices (launch/local_multihost.sh, gloo collectives).

A label fraction leaves each process's shard with its own number of training images, so the
number of steps must come from the whole subset, or the processes would run different step
counts. Evaluation must cover every example once and give every process (and results.json) the
metrics of the whole split: the 2-process results are compared with this process (1 x 8
devices) evaluating the same checkpoint.
"""

import dataclasses
import json
import pathlib
import shutil

import local_launch
import pytest

from configs import finetune_cxr
from micle_jax import finetune, specs
from micle_jax.data import finetune_input, input_pipeline, tasks

_CONFIG = "demo,no_shift,linear"
_BATCH_SIZE = 8


def _settings(data_dir: str) -> dict:
  return {
    "dataset.data_dir": data_dir,
    "batch_size": _BATCH_SIZE,
    "eval_batch_size": 16,
    "label_fraction": 0.5,
    "num_epochs": 1,
    "num_steps": -1,  # one epoch of the subset, not the demo's fixed step count
    "bootstrap_samples": 20,
    "log_every_steps": 1,
    "model.proj_out_dim": 16,
  }


def _config(data_dir: str):
  config = finetune_cxr.get_config(_CONFIG)
  for key, value in _settings(data_dir).items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def two_processes(cxr_data_dir, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("multihost_finetune") / "two_processes"
  flags = [f"--config.{key}={value}" for key, value in _settings(cxr_data_dir).items()]
  local_launch.launch(
    "micle_jax.finetune",
    2,
    [f"--config=configs/finetune_cxr.py:{_CONFIG}", f"--workdir={workdir}", *flags],
    log_dir=workdir.parent / "logs",
  )
  return workdir


@pytest.mark.slow
def test_two_processes_finetune_the_whole_subset_and_evaluate_every_example(
  two_processes, cxr_data_dir
):
  results = json.loads((two_processes / finetune.RESULTS_FILE).read_text())
  config = _config(cxr_data_dir)
  info = input_pipeline.open_dataset(
    config.dataset.name,
    config.dataset.train_split,
    cxr_data_dir,
    specs.LabelSpec(),
    config.dataset.views,
  )
  label_fn = tasks.get(config.labels.task).label_fn(finetune.validate(config).labels)
  subset = finetune_input.label_fraction_ids(
    info, label_fn=label_fn, fraction=config.label_fraction, seed=config.seed
  )
  assert results["num_train_images"] == subset.num_examples
  written = json.loads((two_processes / finetune.TRAIN_PATIENTS_FILE).read_text())
  assert written == sorted(subset.patients)
  assert results["step"] == subset.num_examples // _BATCH_SIZE > 0
  validation = dataclasses.replace(info, split=config.dataset.eval_split)
  frontal = input_pipeline.count_split(validation).images  # the views the config evaluates
  assert results["eval"]["in_distribution"]["num_images"] == frontal

  # This process (8 devices) resumes the final checkpoint, so it only evaluates.
  here = two_processes.parent / "one_process"
  shutil.copytree(two_processes, here)
  expected = finetune.train_and_evaluate(config, str(here))
  assert expected["step"] == results["step"]
  got, want = results["eval"]["in_distribution"], expected["eval"]["in_distribution"]
  assert got["num_images"] == want["num_images"] and got["num_cases"] == want["num_cases"]
  assert set(got["metrics"]) == set(want["metrics"])
  for name, metric in want["metrics"].items():
    for key, value in metric.items():
      if value is None or isinstance(value, str):
        assert got["metrics"][name][key] == value, (name, key)
      else:
        assert got["metrics"][name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)

"""Reusing a workdir: which stored configs describe the run about to start."""

import json

import pytest

from configs import finetune_cxr
from micle_jax.runtime import run_files


def _stored(workdir, config) -> None:
  run_files.write_config(workdir, config)


def test_a_workdir_written_before_task_joined_labels_is_still_this_run(tmp_path):
  config = finetune_cxr.get_config("demo")
  old = run_files.config_dict(config)
  old["task"] = old["labels"].pop("task")  # how fine-tuning configs were written before
  (tmp_path / run_files.CONFIG_FILE).write_text(json.dumps(old))
  run_files.check_reusable(tmp_path, config, what="resume", allow_length_change=False)
  assert run_files.upgrade(old) == run_files.config_dict(config)


def test_another_config_is_refused_naming_the_keys(tmp_path):
  config = finetune_cxr.get_config("demo")
  _stored(tmp_path, config)
  changed = finetune_cxr.get_config("demo")
  changed.labels.task = "nih"
  changed.seed = 3
  with pytest.raises(ValueError, match=r"cannot resume.*labels.task: 'chexpert' -> 'nih'.*seed"):
    run_files.check_reusable(tmp_path, changed, what="resume", allow_length_change=True)
  changed = finetune_cxr.get_config("demo")
  changed.num_steps = 7  # a length change may resume, with a warning
  run_files.check_reusable(tmp_path, changed, what="resume", allow_length_change=True)
  with pytest.raises(ValueError, match="num_steps"):
    run_files.check_reusable(tmp_path, changed, what="skip", allow_length_change=False)


def test_read_json_if_exists_reads_a_written_file_and_is_none_without_one(tmp_path):
  assert run_files.read_json_if_exists(tmp_path / run_files.PRETRAINING_FILE) is None
  run_files.write_json(tmp_path / run_files.PRETRAINING_FILE, {"steps": 3})
  assert run_files.read_json_if_exists(tmp_path / run_files.PRETRAINING_FILE) == {"steps": 3}

"""End to end on 8 devices: pretraining writes checkpoints and events, resumes bit for bit,
stops cleanly on SIGTERM, guards against NaN, and honours init_from."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
import tensorflow as tf
from etils import epath

from configs import cxr
from micle_jax import pretrain
from micle_jax.runtime import checkpoint
from micle_jax.train import steps

_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _config(data_dir, **overrides):
  config = cxr.get_config("demo")
  config.dataset.data_dir = data_dir
  config.batch_size = 8
  config.augment.image_size = 32
  config.num_steps = 6
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.model.proj_out_dim = 16
  config.optimizer.warmup_epochs = 1.0
  config.probe.update(max_images=24, k=3, batch_size=16)  # data_dir: the dataset's
  config.labels.task = "chexpert"  # the supervised monitor, which init_from must never carry over
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


def _assert_trees_equal(a, b):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def uninterrupted(cxr_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  # From a folder without the demo's data/: the probe must find its images beside the dataset's.
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    state = pretrain.train_and_evaluate(_config(cxr_data_dir), str(workdir))
  finally:
    os.chdir(cwd)
  return workdir, jax.device_get(state)


def test_run_writes_checkpoints_events_and_config(uninterrupted, num_devices):
  workdir, state = uninterrupted
  assert int(state.step) == 6
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    2,
    4,
    6,
  ]
  assert list(workdir.glob("events.out.tfevents.*"))
  assert json.loads((workdir / "config.json").read_text())["method"] == "micle"
  params, batch_stats, step = checkpoint.load_weights(workdir)
  assert step == 6
  _assert_trees_equal(params, state.params)
  _assert_trees_equal(batch_stats, state.batch_stats)


def test_sigterm_saves_and_resume_is_bit_identical_and_the_probe_changes_nothing(
  uninterrupted, cxr_data_dir, tmp_path, monkeypatch
):
  """Stopped by SIGTERM at step 3 and resumed, without the probe, a run ends with exactly the
  state of the uninterrupted run with the probe: resume is exact, and the probe trains nothing."""
  _, expected = uninterrupted
  no_probe = {"probe.dataset": ""}
  compile_step = steps.compile_pretrain_step

  def compile_with_sigterm(*args, **kwargs):
    step_fn = compile_step(*args, **kwargs)

    def step_then_signal(state, batch):
      out = step_fn(state, batch)
      if int(out[0].step) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    return step_then_signal

  monkeypatch.setattr(steps, "compile_pretrain_step", compile_with_sigterm)
  stopped = pretrain.train_and_evaluate(_config(cxr_data_dir, **no_probe), str(tmp_path))
  assert int(stopped.step) == 3
  assert checkpoint.load_weights(tmp_path)[2] == 3  # saved at the signal, off the cadence
  monkeypatch.setattr(steps, "compile_pretrain_step", compile_step)
  resumed = jax.device_get(
    pretrain.train_and_evaluate(_config(cxr_data_dir, **no_probe), str(tmp_path))
  )
  assert json.loads((tmp_path / "pretraining.json").read_text())["probe"] is None
  assert int(resumed.step) == 6
  _assert_trees_equal(resumed.params, expected.params)
  _assert_trees_equal(resumed.batch_stats, expected.batch_stats)
  _assert_trees_equal(resumed.opt_state, expected.opt_state)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  uninterrupted, cxr_data_dir, tmp_path, monkeypatch
):
  source, _ = uninterrupted
  shutil.copytree(source, tmp_path, dirs_exist_ok=True)
  for step in ("4", "6"):  # the run as it stood at step 2
    shutil.rmtree(tmp_path / "checkpoints" / step)
  compile_step = steps.compile_pretrain_step

  def compile_with_nan(*args, **kwargs):
    step_fn = compile_step(*args, **kwargs)

    def step_then_nan(state, batch):
      state, metrics = step_fn(state, batch)
      return state, dict(metrics, loss=metrics["loss"] * float("nan"))

    return step_then_nan

  monkeypatch.setattr(steps, "compile_pretrain_step", compile_with_nan)
  with pytest.raises(FloatingPointError, match="at step 3 .*last good checkpoint is step 2"):
    pretrain.train_and_evaluate(_config(cxr_data_dir), str(tmp_path))
  params, _, step = checkpoint.load_weights(tmp_path)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_init_from_loads_the_pretrained_weights(uninterrupted, cxr_data_dir, tmp_path):
  source_dir, source = uninterrupted
  config = _config(
    cxr_data_dir,
    init_from=str(source_dir),
    seed=123,
    num_steps=1,
    **{"optimizer.base_learning_rate": 0.0},
  )
  state = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path)))
  # lr = 0: the step leaves the parameters as loaded (BatchNorm statistics still move) ...
  for part in ("backbone", "projection_head"):
    _assert_trees_equal(state.params[part], source.params[part])
  # ... but the supervised monitor, trained on labels, is never carried over.
  assert not np.array_equal(
    state.params["head_supervised"]["kernel"], source.params["head_supervised"]["kernel"]
  )
  assert int(state.step) == 1  # the optimizer and step start fresh
  summary = json.loads((tmp_path / "pretraining.json").read_text())["init"]
  assert summary["source"] == "init_from" and summary["step"] == 6
  assert "head_supervised/kernel" in summary["fresh"]


def test_resuming_under_another_config_fails_naming_the_keys(uninterrupted, cxr_data_dir, tmp_path):
  source_dir, _ = uninterrupted
  shutil.copytree(source_dir, tmp_path / "run")
  changed = _config(cxr_data_dir, seed=5, **{"optimizer.base_learning_rate": 0.5})
  with pytest.raises(ValueError, match=r"cannot resume.*optimizer.base_learning_rate.*seed"):
    pretrain.train_and_evaluate(changed, str(tmp_path / "run"))


def test_pretraining_records_its_budget(uninterrupted):
  workdir, _ = uninterrupted
  summary = json.loads((workdir / "pretraining.json").read_text())
  assert summary["step"] == summary["total_steps"] == 6
  assert summary["pairs_seen"] == 6 * 8 and summary["views_seen"] == 2 * 6 * 8
  assert summary["num_images"] > summary["num_examples"]  # MICLe: cases hold several images
  assert summary["init"]["source"] == "scratch"
  # How far the contrastive task got, beside chance for batch 8 (15 candidates per row).
  contrastive = summary["contrastive"]
  assert contrastive["step"] == 6
  assert contrastive["chance_accuracy"] == pytest.approx(1 / 15)
  assert contrastive["chance_loss"] == pytest.approx(2 * np.log(15))
  assert 0.0 <= contrastive["accuracy"] <= 1.0 and contrastive["loss"] > 0


def test_the_probe_scores_every_checkpoint(uninterrupted):
  workdir, _ = uninterrupted
  summary = json.loads((workdir / "pretraining.json").read_text())
  assert summary["probe_images"] == 24  # max_images, counted after the view filter
  history = summary["probe"]
  assert sorted(history, key=int) == ["0", "2", "4", "6"]  # initialisation + every checkpoint
  assert all(0.0 <= h["mean_auc"] <= 1.0 for h in history.values())
  assert set(history["6"]) == {"mean_auc"} | {f"auc/{n}" for n in _COMPETITION}
  assert history["0"] != history["6"]  # it measures the network as it trains
  tags = {
    v.tag
    for path in workdir.glob("events.out.tfevents.*")
    for event in tf.compat.v1.train.summary_iterator(str(path))
    for v in event.summary.value
  }
  assert "probe/mean_auc" in tags
  # That it changes nothing in the run: test_sigterm_saves_and_resume_is_bit_identical_and_...


def test_init_from_a_different_architecture_names_the_parameters(
  uninterrupted, cxr_data_dir, tmp_path
):
  source_dir, _ = uninterrupted
  config = _config(cxr_data_dir, init_from=str(source_dir), **{"model.width": 0.5})
  with pytest.raises(ValueError, match=r"backbone/stem_conv_0/kernel: expected shape"):
    pretrain.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("method", "byol", "config.method"),
    ("temperature", 0.0, "config.temperature"),
    ("batch_size", 12, "config.batch_size=12 must be a positive multiple of the 8"),
    ("augment.preset", "mri", "config.augment.preset"),
    ("model.depth", 42, "model.depth=42"),
    ("optimizer.name", "adam", "optimizer.name"),
    ("labels.task", "regression", "task='regression'"),
    ("probe.task", "mri", "probe.task='mri'"),
    ("probe.views", "oblique", "probe.views"),
  ],
)
def test_invalid_config_fails_before_any_work(cxr_data_dir, tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    pretrain.train_and_evaluate(_config(cxr_data_dir, **{key: value}), str(tmp_path / "w"))
  assert not epath.Path(tmp_path / "w" / "checkpoints").exists()


def test_unknown_config_keys_and_arguments_fail():
  config = cxr.get_config()
  with pytest.raises(AttributeError):
    config.learning_rate = 0.1  # locked: a typo cannot add a key
  with pytest.raises(ValueError, match="config argument 'widht' unknown"):
    cxr.get_config("widht=2")
  assert cxr.get_config("method=simclr,width=2").dataset.name == "chexpert_micle/images"

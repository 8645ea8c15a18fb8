"""Multi-process pretraining: 2 processes x 4 CPU devices (launch/local_multihost.sh, gloo
collectives) train as 1 process x 8 devices does, and checkpoints move between the two.

Each process reads its own shard of the split (`input_pipeline.process_split_of`), so a 2-process
global batch holds other examples than a 1-process one. The 1-process reference therefore runs
in this test process (8 devices, see conftest) with its input patched to read the two shards and
lay them out as `sharding.make_global_batch` does: same global batches, so the same losses and
parameters up to the order of floating-point reductions.

To compile as little as possible (compiling dominates the run time on CPU), one 1-process run
takes step 1; the 2-process run resumes its checkpoint and takes steps 2-4, and so does the
1-process reference; the final states are compared after restoring the 2-process checkpoint here.
"""

import dataclasses
import pathlib
import shutil

import jax
import local_launch
import numpy as np
import pytest
import tensorflow as tf

from configs import cxr
from micle_jax import pretrain, specs
from micle_jax.data import input_pipeline
from micle_jax.runtime import checkpoint, sharding

_PROCESSES = 2
# tests/test_pretrain.py's tiny run, 4 steps, at a learning rate low enough that rounding differences
# stay small: at the demo's 1.0 (gradient norms ~600), a 4e-7 relative difference in the step-3
# loss grew to 4e-4 at step 4.
_OVERRIDES = {
  "batch_size": 8,
  "augment.image_size": 32,
  "num_steps": 4,
  "log_every_steps": 1,
  "checkpoint_every_steps": 3,
  "keep_checkpoints": 10,
  "model.proj_out_dim": 16,
  "optimizer.warmup_epochs": 1.0,
  "optimizer.base_learning_rate": 0.01,
  "probe.dataset": "",  # the probe reads and trains nothing; here it would only add compiling
}
# Summation order across 2 × 4 vs 8 devices: up to 1.1e-3 seen (AVX-512 VM) at XLA's default
# optimisation; with the suite's unoptimised compilation (conftest), 5.2e-3 on a BatchNorm bias
# that moved by 2e-4 in all and 1.0e-2 on its momentum. A process's lost gradients would make the
# change differ by about half of itself.
_RTOL = 2e-2


def _settings(data_dir: str, **overrides) -> dict:
  return {**_OVERRIDES, "dataset.data_dir": data_dir, **overrides}


def _config(data_dir: str, **overrides):
  config = cxr.get_config("demo")
  for key, value in _settings(data_dir, **overrides).items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


def _launch(workdir: pathlib.Path, data_dir: str, **overrides) -> None:
  """Pretrains in `_PROCESSES` local processes of 4 CPU devices each, via the launcher."""
  flags = [f"--config.{key}={value}" for key, value in _settings(data_dir, **overrides).items()]
  local_launch.launch(
    "micle_jax.main",
    _PROCESSES,
    ["--config=configs/cxr.py:demo", f"--workdir={workdir}", *flags],
    log_dir=workdir.parent / f"{workdir.name}_logs",
  )


def _process_split(split: str, index: int, count: int):
  """`input_pipeline.process_split_of(split)` as process `index` of `count` would see it."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, "process_count", lambda: count)
    patch.setattr(jax, "process_index", lambda: index)
    return input_pipeline.process_split_of(split)


def _as_if_two_processes(pretrain_batches):
  """Wraps `input_pipeline.pretrain_batches` to yield the global batches of `_PROCESSES`
  processes: process p's local batch as rows [p·b, (p+1)·b), as in `make_global_batch`."""

  def batches(info, *, local_batch_size, per_epoch, **kwargs):
    del per_epoch  # this process's; each simulated process has its own
    streams = []
    for index in range(_PROCESSES):
      split = _process_split(info.split, index, _PROCESSES)
      shard = dataclasses.replace(
        info,
        process_split=split,
        num_examples_per_process=info.builder.info.splits[split].num_examples,
      )
      local = local_batch_size // _PROCESSES
      shard_epoch = shard.num_examples_per_process // local
      streams.append(
        pretrain_batches(shard, local_batch_size=local, per_epoch=shard_epoch, **kwargs)
      )
    for parts in zip(*streams, strict=True):
      yield jax.tree_util.tree_map(lambda *rows: np.concatenate(rows), *parts)

  return batches


def _train_one_process(workdir: pathlib.Path, data_dir: str, **overrides):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      input_pipeline,
      "pretrain_batches",
      _as_if_two_processes(input_pipeline.pretrain_batches),
    )
    state = pretrain.train_and_evaluate(_config(data_dir, **overrides), str(workdir))
  return jax.device_get(state)


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """{step: loss} from the TensorBoard events that process 0 wrote."""
  losses = {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return losses


def _assert_trees_close(a, b, start=None):
  """Leaf by leaf, ‖a − b‖ ≤ _RTOL · ‖b − start‖ (the change both runs made since `start`), or
  ≤ _RTOL · ‖b‖ without `start`.

  Norm-wise, because elementwise tolerances fail on near-zero elements (a BatchNorm bias of 4e-3
  whose gradient changes sign differs by 1% between summation orders), and relative to the
  change, because that is what two runs of the same steps must agree on: were one process's
  gradients lost, the change would differ by about half of itself.
  """
  starts = (
    jax.tree_util.tree_leaves(start)
    if start is not None
    else [None] * len(jax.tree_util.tree_leaves(b))
  )
  for (path, x), y, s in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), starts, strict=True
  ):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.linalg.norm(y - np.asarray(s, np.float64)) if s is not None else np.linalg.norm(y)
    error = np.linalg.norm(x - y)
    assert error <= _RTOL * scale + 1e-9, (jax.tree_util.keystr(path), error, scale)


def _restore_here(workdir: pathlib.Path, like) -> dict:
  """The latest checkpoint of `workdir`, restored replicated over this process's 8 devices."""
  mngr = checkpoint.manager(workdir, read_only=True)
  target = sharding.replicate(checkpoint.state_to_tree(like), sharding.create_mesh())
  tree = checkpoint.restore(mngr, mngr.latest_step(), target)
  mngr.close()
  return jax.device_get(tree)


@pytest.fixture(scope="module")
def step_one(cxr_data_dir, tmp_path_factory) -> pathlib.Path:
  """A 1-process checkpoint after step 1."""
  workdir = tmp_path_factory.mktemp("multihost") / "step_one"
  _train_one_process(workdir, cxr_data_dir, max_steps_per_run=1)
  return workdir


@pytest.fixture(scope="module")
def two_processes(step_one, cxr_data_dir) -> pathlib.Path:
  """Steps 2-4 in 2 processes, resumed from the 1-process checkpoint."""
  workdir = step_one.parent / "two_processes"
  shutil.copytree(step_one, workdir)
  _launch(workdir, cxr_data_dir)
  return workdir


@pytest.fixture(scope="module")
def one_process(step_one, cxr_data_dir):
  """Steps 2-4 in this process (1 process, 8 devices)."""
  workdir = step_one.parent / "one_process"
  shutil.copytree(step_one, workdir)
  return workdir, _train_one_process(workdir, cxr_data_dir)


def test_process_shards_read_each_example_once(cxr_data_dir):
  info = input_pipeline.open_dataset(
    "chexpert_micle/patients", "train", cxr_data_dir, specs.LabelSpec()
  )

  def case_ids(split) -> list[bytes]:
    examples = info.builder.as_dataset(split=split, shuffle_files=False)
    return [example["case_id"] for example in examples.as_numpy_iterator()]

  for split in ("train", "train[:23]"):
    everything = case_ids(split)
    shards = [case_ids(_process_split(split, i, _PROCESSES)) for i in range(_PROCESSES)]
    assert len(shards[0]) == len(shards[1]) == len(everything) // _PROCESSES
    assert not set(shards[0]) & set(shards[1])
    covered = set(shards[0]) | set(shards[1])
    assert covered <= set(everything)
    assert len(everything) - len(covered) <= _PROCESSES - 1


@pytest.mark.slow
def test_two_processes_resume_and_train_as_one(two_processes, one_process, step_one):
  one_dir, expected = one_process
  losses, expected_losses = _losses(two_processes), _losses(one_dir)
  assert sorted(losses) == sorted(expected_losses) == [1, 2, 3, 4]
  np.testing.assert_allclose(
    [losses[s] for s in (2, 3, 4)], [expected_losses[s] for s in (2, 3, 4)], rtol=1e-5
  )
  # The 2-process checkpoint restores in this 1-process, 8-device process.
  restored = _restore_here(two_processes, expected)
  start = _restore_here(step_one, expected)
  assert int(restored["step"]) == int(expected.step) == 4
  for key in ("params", "batch_stats"):
    _assert_trees_close(restored[key], getattr(expected, key), start[key])
  _assert_trees_close(restored["opt_state"], expected.opt_state)


@pytest.mark.slow
def test_load_weights_reads_a_two_process_checkpoint(two_processes, one_process, step_one):
  params, _, step = checkpoint.load_weights(two_processes)
  assert step == 4
  start, _, _ = checkpoint.load_weights(step_one)
  _assert_trees_close(params, one_process[1].params, start)

"""The contrastive train step: 1 device == 8 devices, and training actually learns."""

import jax
import numpy as np
import pytest
from tiny_models import tiny_spec

from micle_jax import specs
from micle_jax.models import resnet
from micle_jax.runtime import sharding
from micle_jax.train import optim, steps, train_state

SIZE = 32
STEPS = 60


def _state(mesh, spec, learning_rate=0.01, opt=None):
  model = resnet.create_model(spec)
  opt = opt or specs.OptimizerSpec(name="lars", weight_decay=1e-4)
  tx = optim.create_optimizer(opt, learning_rate=learning_rate)
  return train_state.create_train_state(model, tx, seed=0, image_shape=(SIZE, SIZE, 3), mesh=mesh)


def _batch(rng, n, num_classes=3):
  return {
    "view1": rng.uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32),
    "view2": rng.uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32),
    "label": rng.integers(0, num_classes, size=(n,)).astype(np.int32),
    "multi_image": (np.arange(n) % 4 == 0).astype(np.float32),
  }


def _run(devices, batches):
  mesh = sharding.create_mesh(devices)
  state = _state(mesh, tiny_spec(num_classes=3))
  init = jax.device_get(state)  # the step donates the state
  step = steps.compile_pretrain_step(mesh, temperature=0.1, label_loss="multiclass")
  history = []
  for batch in batches:
    state, metrics = step(state, sharding.make_global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  return init, jax.device_get(state), history


def test_one_device_equals_eight_devices(num_devices):
  rng = np.random.default_rng(0)
  batches = [_batch(rng, 16) for _ in range(2)]
  _, state1, hist1 = _run(jax.devices()[:1], batches)
  init, state8, hist8 = _run(jax.devices(), batches)
  for m1, m8 in zip(hist1, hist8, strict=True):
    for key in ("loss", "contrast_loss", "contrast_acc", "sup_loss", "pos_sim", "neg_sim"):
      np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m8["multi_image_fraction"] == pytest.approx(0.25)
  assert int(state1.step) == int(state8.step) == 2
  for tree in ("params", "batch_stats"):
    leaves1 = jax.tree_util.tree_leaves_with_path(getattr(state1, tree))
    leaves8 = jax.tree_util.tree_leaves(getattr(state8, tree))
    for (path, a), b in zip(leaves1, leaves8, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The step changed the parameters and the running statistics.
  moved = jax.tree_util.tree_map(
    lambda a, b: float(np.abs(a - b).max()), init.batch_stats, state8.batch_stats
  )
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_batch_not_divisible_by_devices_fails_clearly(num_devices):
  mesh = sharding.create_mesh()
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the 8"):
    sharding.check_batch_size(12, mesh)


def _patterns(rng, k):
  """k smooth random 40×40 colour patterns (upsampled 5×5 noise)."""
  coarse = rng.uniform(size=(k, 5, 5, 3))
  return np.clip(coarse.repeat(8, axis=1).repeat(8, axis=2), 0, 1).astype(np.float32)


def _view(rng, pattern):
  """A random 32×32 crop, flip and brightness/noise change of one pattern."""
  y, x = rng.integers(0, 9, size=2)
  v = pattern[y : y + SIZE, x : x + SIZE]
  if rng.uniform() < 0.5:
    v = v[:, ::-1]
  v = v * rng.uniform(0.7, 1.3) + rng.normal(scale=0.05, size=v.shape)
  return np.clip(v, 0, 1).astype(np.float32)


@pytest.mark.slow
def test_contrastive_training_lowers_loss_and_raises_accuracy(num_devices):
  rng = np.random.default_rng(0)
  patterns = _patterns(rng, 64)
  mesh = sharding.create_mesh()
  opt = specs.OptimizerSpec(name="lars", weight_decay=1e-6)
  schedule = optim.warmup_cosine_schedule(1.0, total_steps=STEPS, warmup_steps=10)
  state = _state(mesh, tiny_spec(), learning_rate=schedule, opt=opt)
  step = steps.compile_pretrain_step(mesh, temperature=0.2)
  history = []
  for _ in range(STEPS):
    ids = rng.choice(len(patterns), size=32, replace=False)
    batch = {
      "view1": np.stack([_view(rng, patterns[i]) for i in ids]),
      "view2": np.stack([_view(rng, patterns[i]) for i in ids]),
    }
    state, metrics = step(state, sharding.make_global_batch(batch, mesh))
    history.append(jax.device_get(metrics))
  first = np.mean([m["contrast_loss"] for m in history[:10]])
  last = np.mean([m["contrast_loss"] for m in history[-10:]])
  acc_first = np.mean([m["contrast_acc"] for m in history[:10]])
  acc_last = np.mean([m["contrast_acc"] for m in history[-10:]])
  assert np.all(np.isfinite([m["loss"] for m in history]))
  assert last < 0.7 * first, (first, last)
  assert acc_last > acc_first + 0.3, (acc_first, acc_last)

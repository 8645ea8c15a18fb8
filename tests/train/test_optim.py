"""LARS masks and update order against a float64 reference; schedules; batch-size scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from micle_jax import specs
from micle_jax.train import optim


def _params(rng):
  return {
    "backbone": {
      "conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4))},
      "bn_0": {"scale": rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
    },
    "projection_head": {"dense_0": {"kernel": rng.normal(size=(4, 4))}},
    "head_supervised": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
  }


def test_masks_exclude_batchnorm_and_biases():
  decay, trust = optim.lars_masks(_params(np.random.default_rng(0)))
  assert decay["backbone"]["conv_0"]["kernel"] and trust["backbone"]["conv_0"]["kernel"]
  assert decay["projection_head"]["dense_0"]["kernel"]
  for mask in (decay, trust):
    assert not mask["backbone"]["bn_0"]["scale"] and not mask["backbone"]["bn_0"]["bias"]
    assert not mask["head_supervised"]["bias"]
  # Pretraining's monitor: the head's kernel is decayed and trust-scaled like every kernel.
  assert decay["head_supervised"]["kernel"] and trust["head_supervised"]["kernel"]
  # Fine-tuning, as SimCLR: decayed (SimCLR's explicit L2 term) but never trust-scaled.
  decay, trust = optim.lars_masks(_params(np.random.default_rng(0)), trust_scale_head=False)
  assert decay["head_supervised"]["kernel"] and not trust["head_supervised"]["kernel"]
  assert trust["backbone"]["conv_0"]["kernel"] and trust["projection_head"]["dense_0"]["kernel"]


def _reference_lars(params, grads_seq, lr, wd, eta, momentum, trust_head=True):
  """Float64 LARS: decay → trust ratio → lr → momentum trace, per leaf, per the masks' rules."""
  flat_p = {
    jax.tree_util.keystr(k): np.array(v, np.float64)
    for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  trace = {k: np.zeros_like(v) for k, v in flat_p.items()}
  for grads in grads_seq:
    flat_g = {
      jax.tree_util.keystr(k): np.array(v, np.float64)
      for k, v in jax.tree_util.tree_leaves_with_path(grads)
    }
    for key, w in flat_p.items():
      g = flat_g[key]
      is_kernel = key.endswith("['kernel']")
      if is_kernel:
        g = g + wd * w
      if is_kernel and (trust_head or "head_supervised" not in key):
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        trust = eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
        g = trust * g
      trace[key] = momentum * trace[key] + lr * g
      flat_p[key] = w - trace[key]
  return flat_p


@pytest.mark.parametrize("trust_head", [True, False])
def test_lars_step_matches_reference(trust_head):
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads_seq = [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape), params) for _ in range(3)]
  spec = specs.OptimizerSpec(name="lars", weight_decay=1e-2, momentum=0.9, trust_coefficient=0.001)
  tx = optim.create_optimizer(spec, learning_rate=0.5, trust_scale_head=trust_head)
  p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree_util.tree_map(jnp.float32, grads), state, p)
    p = optax.apply_updates(p, updates)
  expected = _reference_lars(params, grads_seq, 0.5, 1e-2, 0.001, 0.9, trust_head=trust_head)
  for key, value in jax.tree_util.tree_leaves_with_path(p):
    np.testing.assert_allclose(value, expected[jax.tree_util.keystr(key)], rtol=1e-5, atol=1e-6)
  # BN and bias leaves moved by plain lr-scaled momentum: with η = 1e-3 the kernels barely moved.
  moved_bias = np.abs(p["backbone"]["bn_0"]["bias"] - params["backbone"]["bn_0"]["bias"]).max()
  moved_kernel = np.abs(p["backbone"]["conv_0"]["kernel"] - params["backbone"]["conv_0"]["kernel"])
  assert moved_bias > 100 * moved_kernel.max()
  # Without the trust ratio the head's kernel takes plain momentum steps of lr·(g + wd·w).
  head = np.abs(p["head_supervised"]["kernel"] - params["head_supervised"]["kernel"]).max()
  assert (head > 100 * moved_kernel.max()) == (not trust_head)


def test_zero_norm_gives_trust_one():
  tx = optim.create_optimizer(specs.OptimizerSpec(weight_decay=0.0), learning_rate=1.0)
  p = {"conv": {"kernel": jnp.zeros((2, 2))}}
  updates, _ = tx.update({"conv": {"kernel": jnp.ones((2, 2))}}, tx.init(p), p)
  np.testing.assert_allclose(updates["conv"]["kernel"], -np.ones((2, 2)))


@pytest.mark.parametrize(
  "scaling,batch,expected",
  [("linear", 4096, 4.8), ("linear", 256, 0.3), ("sqrt", 1024, 0.075 * 32), ("none", 64, 0.3)],
)
def test_learning_rate_scaling(scaling, batch, expected):
  base = 0.075 if scaling == "sqrt" else 0.3
  assert optim.scaled_learning_rate(base, batch, scaling) == pytest.approx(expected)


def test_warmup_cosine_schedule_matches_formula():
  peak, total, warmup = 2.0, 100, 10
  schedule = optim.warmup_cosine_schedule(peak, total, warmup)
  for step in [0, 1, 5, 10, 11, 50, 99, 100, 120]:
    if step < warmup:
      expected = peak * step / warmup
    else:
      progress = min((step - warmup) / (total - warmup), 1.0)
      expected = 0.5 * peak * (1 + math.cos(math.pi * progress))
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-6), step


def test_create_schedule_uses_epochs_and_batch():
  spec = specs.OptimizerSpec(base_learning_rate=0.3, lr_scaling="linear", warmup_epochs=2)
  schedule = optim.create_schedule(spec, batch_size=512, total_steps=100, steps_per_epoch=10)
  assert float(schedule(20)) == pytest.approx(0.6)  # peak at the end of 2 warm-up epochs
  assert float(schedule(10)) == pytest.approx(0.3)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_finetune_optimizers_decay_only_kernels(name):
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  spec = specs.OptimizerSpec(name=name, weight_decay=0.1, momentum=0.9)
  tx = optim.create_optimizer(spec, learning_rate=1.0)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["dense"]["kernel"]).sum()) > 0
  assert float(jnp.abs(updates["dense"]["bias"]).sum()) == 0


@pytest.mark.parametrize(
  "field,value", [("name", "adam"), ("lr_scaling", "cube"), ("weight_decay", -1.0)]
)
def test_invalid_spec_names_the_key(field, value):
  with pytest.raises(ValueError, match=f"optimizer.{field}"):
    specs.OptimizerSpec(**{field: value})

"""layers.BatchNorm (the CPU's BatchNorm) equals Flax's and a float64 reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micle_jax.models import layers


def _modules(train: bool, center: bool):
  kwargs = dict(
    use_running_average=not train,
    momentum=layers.BN_MOMENTUM,
    epsilon=layers.BN_EPSILON,
    use_bias=center,
  )
  return layers.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)


def _random_variables(module, x, rng):
  variables = module.init(jax.random.PRNGKey(0), x)
  return jax.tree_util.tree_map(
    lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32), variables
  )


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("shape", [(4, 6, 6, 8), (16, 12)], ids=["nhwc", "projection-head"])
@pytest.mark.parametrize("center", [True, False])
def test_training_equals_flax_batchnorm(shape, center):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours, flax_bn = _modules(train=True, center=center)
  variables = _random_variables(flax_bn, x, rng)
  assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(0), x)) == (
    jax.tree_util.tree_structure(variables)
  )

  def run(module):
    def f(params, x):
      y, updated = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )
      return y, updated

    (y, updated), vjp = jax.vjp(f, variables["params"], x)
    grads = vjp((dy, jax.tree_util.tree_map(jnp.zeros_like, updated)))
    return y, updated, grads

  for a, b in zip(
    jax.tree_util.tree_leaves(jax.jit(lambda: run(ours))()),
    jax.tree_util.tree_leaves(jax.jit(lambda: run(flax_bn))()),
    strict=True,
  ):
    assert a.shape == b.shape
    assert _relative(a, b) < 1e-5


def test_gradient_equals_float64_finite_differences():
  """Central differences of training-mode BatchNorm in float64 NumPy, on a small input."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 2, 2, 3))
  scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
  dy = rng.normal(size=x.shape)

  def loss(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = (x**2).mean((0, 1, 2)) - mean**2
    return np.sum(dy * ((x - mean) / np.sqrt(var + layers.BN_EPSILON) * scale + bias))

  def numeric(which):
    args = [x.copy(), scale.copy(), bias.copy()]
    grad = np.zeros_like(args[which])
    for index in np.ndindex(grad.shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[which][index] += 1e-6
      minus[which][index] -= 1e-6
      grad[index] = (loss(*plus) - loss(*minus)) / 2e-6
    return grad

  module, _ = _modules(train=True, center=True)
  params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}

  def f(params, x):
    y, _ = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.asarray(dy, jnp.float32) * y)

  d_params, dx = jax.grad(f, argnums=(0, 1))(params, jnp.asarray(x, jnp.float32))
  assert _relative(dx, numeric(0)) < 1e-4
  assert _relative(d_params["scale"], numeric(1)) < 1e-4
  assert _relative(d_params["bias"], numeric(2)) < 1e-4


def test_eval_mode_and_initialisation_equal_flax():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 5, 5, 6)), jnp.float32)
  ours, flax_bn = _modules(train=False, center=True)
  variables = _random_variables(flax_bn, x, rng)
  assert _relative(ours.apply(variables, x), flax_bn.apply(variables, x)) < 1e-6
  for train in (True, False):
    a, b = (m.init(jax.random.PRNGKey(0), x) for m in _modules(train=train, center=True))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))


def test_batch_norm_picks_flax_off_cpu():
  with layers.override_kernel_platform("tpu"):
    assert type(layers.batch_norm(True, dtype=jnp.float32)) is nn.BatchNorm
  assert type(layers.batch_norm(True, dtype=jnp.float32)) is layers.BatchNorm


@pytest.mark.parametrize("symmetric", [False, True], ids=["same", "symmetric"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 4), (2, 9, 9, 3), (1, 8, 8, 2), (2, 7, 10, 2)])
def test_max_pool_equals_flax_with_ties(shape, symmetric):
  """Values equal; gradients to float rounding (overlapping windows add in another order), and
  each window's gradient goes to the same one of its tied maxima (ReLU zeros and rounding).
  `symmetric` (torchvision's stem) against Flax with padding 1 on both ends, and PyTorch."""
  rng = np.random.default_rng(shape[1])
  x = jnp.asarray(np.maximum(rng.normal(size=shape), 0).round(1), jnp.float32)
  out_shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])
  dy = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  def value_and_grad(pool):
    y, vjp = jax.vjp(pool, x)
    return y, vjp(dy)[0]

  padding = ((1, 1), (1, 1)) if symmetric else "SAME"
  with layers.override_kernel_platform("cpu"):
    y, dx = jax.jit(
      lambda: value_and_grad(lambda x: layers.max_pool(x, 3, 2, symmetric=symmetric))
    )()
  y_flax, dx_flax = jax.jit(
    lambda: value_and_grad(lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=padding))
  )()
  np.testing.assert_array_equal(y, y_flax)
  if symmetric:
    import torch

    pooled = torch.nn.MaxPool2d(3, 2, padding=1)(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(y, pooled.permute(0, 2, 3, 1).numpy())
    with layers.override_kernel_platform("tpu"):
      np.testing.assert_array_equal(layers.max_pool(x, 3, 2, symmetric=True), y)
  assert float(jnp.mean(x == 0)) > 0.3  # there are ties to break
  np.testing.assert_allclose(dx, dx_flax, rtol=0, atol=1e-6)
  # Which position receives each window's gradient: the same set of non-zero positions.
  np.testing.assert_array_equal(np.asarray(dx) != 0, np.asarray(dx_flax) != 0)


def test_max_pool_uses_flax_off_cpu():
  x = jnp.ones((1, 8, 8, 2))
  with layers.override_kernel_platform("tpu"):
    names = {e.primitive.name for e in jax.make_jaxpr(lambda x: layers.max_pool(x, 3, 2))(x).eqns}
  assert "reduce_window_max" in names

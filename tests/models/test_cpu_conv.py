"""The CPU convolution path: equal to `lax.conv` and to float64, deterministic, CPU only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_reference import assert_matches, reference, reference_grads, relative
from jax import lax
from tiny_models import tiny_spec

from micle_jax import specs
from micle_jax.models import cpu_conv, layers, native_conv, resnet
from micle_jax.runtime import sharding
from micle_jax.train import optim, steps, train_state

# (input side, C, D, stride) for every strided 3×3 convolution the ResNets have, at small sizes:
# basic and bottleneck blocks' first strided conv (C = D, or D = 2C for basic blocks), the SK
# conv (2·filters outputs), the ResNet-D stem's first conv (3 channels in), odd and even sides.
SHAPES = [
  (16, 8, 16, 2),  # basic block: 16 -> 8, doubling the channels
  (9, 16, 16, 2),  # bottleneck 3×3 on an odd map
  (8, 8, 32, 2),  # SK: 2 · filters outputs
  (33, 3, 8, 2),  # ResNet-D stem conv_0 on an odd image
  (32, 3, 8, 2),
  (7, 16, 8, 2),
]


def _xla(x, w, stride):
  x = layers.fixed_padding(x, w.shape[0])
  return lax.conv_general_dilated(
    x, w, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _value_and_grads(conv, x, w, dy):
  y, vjp = jax.vjp(conv, x, w)
  return (y, *vjp(dy))


@pytest.mark.parametrize("side,c,d,stride", SHAPES)
def test_equals_lax_conv_and_float64(side, c, d, stride):
  rng = np.random.default_rng(side * c + d)
  x = rng.normal(size=(3, side, side, c))
  w = rng.normal(size=(3, 3, c, d)) / np.sqrt(9 * c)
  y64, _, _ = reference(x, w, stride)
  dy = rng.normal(size=y64.shape)
  expected = reference_grads(x, w, stride, dy)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, dy)]
  patches = jax.jit(
    functools.partial(_value_and_grads, lambda x, w: cpu_conv.strided_conv(x, w, stride))
  )(*args)
  xla = jax.jit(functools.partial(_value_and_grads, lambda x, w: _xla(x, w, stride)))(*args)
  assert_matches(patches, xla, expected)


def test_bit_identical_run_to_run():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32)
  runs = [
    jax.jit(functools.partial(_value_and_grads, lambda x, w: cpu_conv.strided_conv(x, w, 2)))(
      x, w, dy
    )
    for _ in range(2)  # two separate compilations
  ]
  for a, b in zip(*runs, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_path_is_taken_on_cpu_only():
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert cpu_conv.use_patches("cpu", 3, 2, f32)
  for platform in ("gpu", "tpu", "cuda", "rocm"):
    assert not cpu_conv.use_patches(platform, 3, 2, f32)
  assert not cpu_conv.use_patches("cpu", 3, 1, f32)  # stride 1: XLA's is faster
  assert not cpu_conv.use_patches("cpu", 7, 2, f32)  # the 7×7 stem: no gain measured
  assert not cpu_conv.use_patches("cpu", 3, 2, bf16)
  assert jax.default_backend() == "cpu" and layers.kernel_platform() == "cpu"
  conv = layers.Conv(8, 3, 2)
  x = jnp.ones((1, 9, 9, 4))
  params = conv.init(jax.random.PRNGKey(0), x)

  def primitives(platform):
    with layers.override_kernel_platform(platform), native_conv.disabled():
      assert layers.kernel_platform() == platform
      jaxpr = jax.make_jaxpr(jax.grad(lambda p: conv.apply(p, x).sum()))(params)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}

  on_cpu, off_cpu = primitives("cpu"), primitives("tpu")
  assert "conv_general_dilated" not in on_cpu and "dot_general" in on_cpu
  assert "conv_general_dilated" in off_cpu
  assert layers.kernel_platform() == "cpu"


# (architecture, whether the native convolution may be used): with the library built, the CPU
# kernels are oneDNN's convolutions and our BatchNorm; one model also checks the patch path.
MODELS = [
  (dict(depth=18, stem="cifar"), True),  # basic blocks
  (dict(depth=50, stem="imagenet"), True),  # bottleneck blocks, the 7×7 stem and max pool
  (dict(depth=18, stem="imagenet", sk_ratio=0.0625), False),  # selective kernels, patch path
]


@pytest.mark.parametrize(
  "overrides,native",
  MODELS,
  ids=lambda o: f"r{o['depth']}-{o['stem']}" if isinstance(o, dict) else ("" if o else "patches"),
)
def test_a_model_and_its_gradient_are_as_accurate_as_xlas(overrides, native):
  """Train-mode loss and parameter gradients with the CPU kernels (oneDNN's convolutions where
  built, else patch convolutions; and our BatchNorm) and with XLA's convolution and Flax's
  BatchNorm, each against the same model in float64: over the leaves, the CPU kernels' median
  error is within 2× of XLA's and their worst within 4×, and no leaf is off by 1e-3."""
  spec = tiny_spec(**overrides)
  model = resnet.create_model(spec)
  x = np.random.default_rng(0).uniform(size=(4, 36, 36, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), train=False)

  def value_and_grad(model, variables, x):
    def loss(params):
      out, _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return jnp.sum(out["projection"] ** 2) + jnp.sum(out["features"])

    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  results = {}
  for platform in ("cpu", "tpu"):
    with layers.override_kernel_platform(platform), native_conv.disabled(not native):
      results[platform] = value_and_grad(model, variables, jnp.asarray(x, jnp.float32))
  with jax.enable_x64(), layers.override_kernel_platform("tpu"):
    model64 = model.clone(backbone=model.backbone.clone(dtype=jnp.float64))
    variables64 = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables)
    value64, grads64 = jax.device_get(value_and_grad(model64, variables64, jnp.asarray(x)))
  (value_cpu, grads_cpu), (value_xla, grads_xla) = results["cpu"], results["tpu"]
  assert relative(value_cpu, value64) < 1e-5 and relative(value_xla, value64) < 1e-5
  flat_xla = dict(jax.tree_util.tree_leaves_with_path(grads_xla))
  flat64 = dict(jax.tree_util.tree_leaves_with_path(grads64))
  errors = {}  # leaf -> (our error, XLA's error), both relative to the float64 gradient
  for path, g in jax.tree_util.tree_leaves_with_path(grads_cpu):
    reference = flat64[path]
    assert reference.dtype == np.float64
    if np.abs(reference).max() > 1e-6:
      errors[jax.tree_util.keystr(path)] = (
        relative(g, reference),
        relative(flat_xla[path], reference),
      )
  ours, xlas = np.array(list(errors.values())).T
  worst = max(errors, key=lambda k: errors[k][0])
  assert ours.max() < 1e-3, f"{worst}: {errors[worst]}"
  # Rounding differs leaf by leaf; over the whole model the CPU kernels are as accurate as XLA's.
  assert np.median(ours) <= 2 * np.median(xlas) + 1e-7, (np.median(ours), np.median(xlas))
  assert ours.max() <= 4 * xlas.max() + 1e-6, (worst, errors[worst], xlas.max())


def test_a_training_step_equals_one_with_xlas_convolution():
  rng = np.random.default_rng(0)
  n, size = 8, 32
  batch = {
    "view1": rng.uniform(size=(n, size, size, 3)).astype(np.float32),
    "view2": rng.uniform(size=(n, size, size, 3)).astype(np.float32),
    "label": rng.integers(0, 3, size=(n,)).astype(np.int32),
    "multi_image": np.zeros((n,), np.float32),
  }
  mesh = sharding.create_mesh(jax.devices()[:2])
  results = {}
  for platform in ("cpu", "tpu"):
    with layers.override_kernel_platform(platform):
      model = resnet.create_model(tiny_spec(num_classes=3))
      # lr 0.01 as in tests/train/test_steps.py. At 0.1 the first step's gradient norm is ~500,
      # and rounding differences in the second step grow to 4e-4 of the update on 2 devices
      # (2e-6 on 1) between the two paths.
      tx = optim.create_optimizer(specs.OptimizerSpec(name="lars"), learning_rate=0.01)
      state = train_state.create_train_state(
        model, tx, seed=0, image_shape=(size, size, 3), mesh=mesh
      )
      step = steps.compile_pretrain_step(mesh, temperature=0.1, label_loss="multiclass")
      results["init"] = jax.device_get(state.params)  # the step donates the state
      for _ in range(2):
        state, metrics = step(state, sharding.make_global_batch(batch, mesh))
      results[platform] = jax.device_get((state, metrics))
  (state_cpu, m_cpu), (state_xla, m_xla) = results["cpu"], results["tpu"]
  for key in ("loss", "contrast_loss", "sup_loss"):
    assert relative(m_cpu[key], np.float64(m_xla[key])) < 1e-5, key
  init = jax.device_get(results["init"])
  updates = {}
  flat_xla = dict(jax.tree_util.tree_leaves_with_path(state_xla.params))
  flat_init = dict(jax.tree_util.tree_leaves_with_path(init))
  for path, p in jax.tree_util.tree_leaves_with_path(state_cpu.params):
    updates[jax.tree_util.keystr(path)] = (
      np.asarray(p, np.float64) - flat_init[path],
      np.asarray(flat_xla[path], np.float64) - flat_init[path],
    )
  ours = np.concatenate([u.ravel() for u, _ in updates.values()])
  xlas = np.concatenate([u.ravel() for _, u in updates.values()])
  # Over all parameters (LARS normalises each leaf's update, so a leaf whose gradient is
  # nearly zero moves by rounding alone; the step as a whole is what must agree).
  difference = np.linalg.norm(ours - xlas) / np.linalg.norm(xlas)
  assert difference < 1e-5, difference
  assert np.abs(ours - xlas).max() < 1e-5 * np.abs(xlas).max()

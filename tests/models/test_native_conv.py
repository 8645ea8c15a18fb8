"""oneDNN's convolutions (native_conv): equal to `lax.conv` and to float64, deterministic, sharded
like XLA's, taken on the CPU only; the weight gradient both by oneDNN and by matrix products.

Without the library (`make native`) these tests skip, naming the command; where
MICLE_REQUIRE_NATIVE_CONV=1 (CI builds it) they fail instead.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_reference import assert_matches, reference, reference_grads, relative
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from micle_jax.models import layers, native_conv
from micle_jax.runtime import sharding

# (input side, C, D, kernel, stride, groups): every k×k convolution the ResNets have, at small
# sizes (3×3 at stride 1 and 2 with C = D or D = 2C, the SK conv's 2·filters outputs, the ResNet-D
# stem's first conv and the 7×7 stem, 3 channels in), odd and even sides, and grouped ones.
SHAPES = [
  (16, 8, 8, 3, 1, 1),  # basic block, stride 1
  (16, 8, 16, 3, 2, 1),  # basic block: 16 -> 8, doubling the channels
  (9, 16, 16, 3, 2, 1),  # bottleneck 3×3 on an odd map
  (7, 16, 8, 3, 1, 1),
  (8, 8, 32, 3, 1, 1),  # SK: 2 · filters outputs
  (33, 3, 8, 3, 2, 1),  # ResNet-D stem conv_0 on an odd image
  (32, 3, 8, 7, 2, 1),  # ImageNet stem
  (17, 3, 8, 7, 2, 1),
  (8, 8, 16, 3, 1, 2),  # grouped
  (12, 16, 16, 3, 2, 4),
]


@pytest.fixture(autouse=True)
def _uncached(no_compilation_cache):
  """These tests vary the thread count and the weight-gradient method, which the compilation
  cache's key does not see in the suite (conftest)."""
  del no_compilation_cache


@pytest.fixture(scope="module", autouse=True)
def _native():
  if not native_conv.available():
    message = f"{native_conv.LIBRARY} is not built: run `make native`"
    if os.environ.get("MICLE_REQUIRE_NATIVE_CONV") == "1":
      pytest.fail(message)
    pytest.skip(message)


def _xla(x, w, stride, groups=1):
  k = w.shape[0]
  before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
  return lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    ((before, after), (before, after)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


def _value_and_grads(conv, x, w, dy):
  y, vjp = jax.vjp(conv, x, w)
  return (y, *vjp(dy))


def _grouped_reference(x, w, stride, groups, dy):
  """float64 y, dx, dw of a grouped convolution: each group's channels on their own."""
  c, d = x.shape[-1] // groups, w.shape[-1] // groups
  parts = [
    reference_grads(
      x[..., g * c : (g + 1) * c], w[..., g * d : (g + 1) * d], stride, dy[..., g * d : (g + 1) * d]
    )
    for g in range(groups)
  ]
  return tuple(np.concatenate(p, axis=-1) for p in zip(*parts, strict=True))


@pytest.mark.parametrize("method", ["onednn", "gemm"])
@pytest.mark.parametrize("side,c,d,k,stride,groups", SHAPES)
def test_equals_lax_conv_and_float64(side, c, d, k, stride, groups, method):
  rng = np.random.default_rng(side * c + d + k)
  x = rng.normal(size=(3, side, side, c))
  w = rng.normal(size=(k, k, c // groups, d)) / np.sqrt(k * k * c / groups)
  y_shape = reference(x[..., : c // groups], w[..., : d // groups], stride)[0].shape
  dy = rng.normal(size=(*y_shape[:-1], d))
  expected = _grouped_reference(x, w, stride, groups, dy)
  args = [jnp.asarray(a, jnp.float32) for a in (x, w, dy)]
  with native_conv.weight_gradient(method):
    ours = jax.jit(
      functools.partial(_value_and_grads, lambda x, w: native_conv.conv(x, w, stride, groups))
    )(*args)
  xla = jax.jit(functools.partial(_value_and_grads, lambda x, w: _xla(x, w, stride, groups)))(*args)
  assert_matches(ours, xla, expected)


@pytest.mark.parametrize("method", ["onednn", "gemm"])
def test_bit_identical_run_to_run(method):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(4, 16, 16, 16)), jnp.float32)
  with native_conv.weight_gradient(method):
    runs = [
      jax.jit(functools.partial(_value_and_grads, lambda x, w: native_conv.conv(x, w, 1)))(x, w, dy)
      for _ in range(2)  # two separate compilations
    ]
  for a, b in zip(*runs, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
  "side,c,d,k,stride", [(20, 8, 16, 3, 1), (11, 16, 8, 3, 2), (12, 8, 8, 1, 1)]
)
def test_weight_gradient_by_matrix_products_on_several_threads(
  monkeypatch, threads, side, c, d, k, stride
):
  """The suite's 8 devices give each call one thread; here 2 and 3 split the output positions
  (2 images × the output side²: several chunks of 256 and a short last one; at side 11 one
  chunk, so threads with none), and the result is float64's, the same on every run."""
  monkeypatch.setattr(native_conv, "_threads", lambda: threads)
  rng = np.random.default_rng(side + threads)
  x = rng.normal(size=(2, side, side, c))
  w = rng.normal(size=(k, k, c, d))
  dy = rng.normal(size=(*reference(x, w, stride)[0].shape[:-1], d))
  _, _, expected = reference_grads(x, w, stride, dy)
  x32, dy32 = (jnp.asarray(a, jnp.float32) for a in (x, dy))
  with native_conv.weight_gradient("gemm"):
    shape = (2, side, side, c, d, k, stride, 1)
    assert native_conv.implementation("backward_weights", shape, threads) == "patches+sgemm"
    grad = jax.jit(
      lambda x, dy: native_conv._backward_weights(
        stride, 1, (k, k, c, d), native_conv._method(), x, dy
      )
    )
    runs = [np.asarray(grad(x32, dy32)) for _ in range(2)]
  assert relative(runs[0], expected) < 1e-5
  np.testing.assert_array_equal(runs[0], runs[1])


def test_weight_gradient_methods():
  shape = (2, 9, 9, 4, 8, 3, 1, 1)
  with native_conv.weight_gradient("onednn"):
    assert native_conv.implementation("backward_weights", shape) != "patches+sgemm"
    with native_conv.weight_gradient("gemm"):
      assert native_conv.implementation("backward_weights", shape) == "patches+sgemm"
      grouped = (2, 9, 9, 4, 8, 3, 1, 2)  # grouped convolutions are always oneDNN's
      assert native_conv.implementation("backward_weights", grouped) != "patches+sgemm"
  with pytest.raises(ValueError, match="'sgemm' is not one of"):
    with native_conv.weight_gradient("sgemm"):
      pass


def test_eight_devices_equal_one_and_keep_the_batch_split(num_devices):
  """A two-convolution loss and its gradients on a batch sharded over 8 devices equal the same on
  one device; the compiled step gathers no activations and reduces the weight gradients."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(16, 12, 12, 4)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(3, 3, 4, 8)) / 6, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(3, 3, 8, 8)) / 8, jnp.float32)

  def loss(x, w1, w2):
    h = jax.nn.relu(native_conv.conv(x, w1, 2))
    return jnp.sum(jnp.sin(native_conv.conv(h, w2, 1)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  one = jax.device_get(grad(x, w1, w2))
  mesh = sharding.create_mesh(jax.devices())
  assert mesh.size == num_devices
  xs = jax.device_put(x, NamedSharding(mesh, P(sharding.DATA_AXIS)))
  ws = [jax.device_put(w, NamedSharding(mesh, P())) for w in (w1, w2)]
  value, grads = grad(xs, *ws)
  assert grads[0].sharding.spec[0] == sharding.DATA_AXIS  # dx stays split by the batch
  assert grads[1].sharding.is_fully_replicated
  hlo = grad.lower(xs, *ws).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" in hlo
  assert relative(value, np.float64(one[0])) < 1e-5
  for ours, expected in zip(jax.device_get(grads), one[1], strict=True):
    assert relative(ours, np.asarray(expected, np.float64)) < 1e-5


def test_taken_on_the_cpu_in_float32_unless_turned_off(monkeypatch):
  assert layers.use_native_conv("cpu", jnp.float32)
  for platform in ("gpu", "tpu", "cuda", "rocm"):
    assert not layers.use_native_conv(platform, jnp.float32)
  assert not layers.use_native_conv("cpu", jnp.bfloat16)
  with native_conv.disabled():
    assert not layers.use_native_conv("cpu", jnp.float32)
  monkeypatch.setenv(native_conv.ENV_SWITCH, "0")
  assert not native_conv.available()
  monkeypatch.delenv(native_conv.ENV_SWITCH)

  conv = layers.Conv(8, 3, 2)
  x = jnp.ones((2, 9, 9, 4))
  params = conv.init(jax.random.PRNGKey(0), x)

  def primitives(platform):
    with layers.override_kernel_platform(platform):
      jaxpr = jax.make_jaxpr(jax.grad(lambda p: conv.apply(p, x).sum()))(params)
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}

  on_cpu = primitives("cpu")
  assert "conv_general_dilated" not in on_cpu and "custom_partitioning" in on_cpu
  assert "conv_general_dilated" in primitives("tpu")
  assert native_conv.implementation("forward", (2, 9, 9, 4, 8, 3, 2, 1))


def test_a_library_that_does_not_load_is_named(monkeypatch, tmp_path):
  broken = tmp_path / "libmicle_onednn.so"
  broken.write_text("not a shared object")
  monkeypatch.setattr(native_conv, "LIBRARY", broken)
  monkeypatch.setattr(native_conv, "_library", [])
  with pytest.raises(native_conv.NativeConvError, match=r"libmicle_onednn.so.*make native"):
    native_conv.available()


def test_a_library_loading_another_onednn_than_its_headers_is_refused():
  class Library:
    def __init__(self, versions):
      self.versions = versions

    def micle_onednn_versions(self, out):
      out[:] = self.versions

  native_conv._check_versions(Library([3, 2, 0, 3, 2, 1]))  # a patch release apart: the same API
  with pytest.raises(
    native_conv.NativeConvError, match=r"oneDNN 3\.2\.0's headers but loads oneDNN 3\.5\.0"
  ):
    native_conv._check_versions(Library([3, 2, 0, 3, 5, 0]))


def test_the_run_records_which_convolution_it_takes():
  described = native_conv.describe()
  assert described["convolution"] == "native" and described["onednn"].startswith("3.2.")
  assert described["threads"] >= 1 and described["onednn_isa"].startswith(("avx", "sse"))
  with native_conv.disabled():
    assert native_conv.describe() == {"convolution": "xla"}


def test_the_benchmark_counts_its_flops_as_three_convolutions():
  """Forward, input and weight gradient: 3 × the forward's FLOPs, as XLA's are counted at
  stride 1 (at stride 2 the count of XLA's input gradient includes the dilation's zeros)."""
  from micle_jax.tools import benchmark_train

  x, w = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 2, 8))
  for stride, side in ((1, 9), (2, 5)):
    counted = {}
    for name, conv in (("native", native_conv.conv), ("xla", _xla)):
      grad = jax.grad(
        lambda x, w, conv=conv, stride=stride: jnp.sum(conv(x, w, stride, 2) ** 2), argnums=(0, 1)
      )
      counted[name] = benchmark_train.jaxpr_flops_by_kind(jax.make_jaxpr(grad)(x, w))
    forward = 2 * (2 * side * side * 8) * 3 * 3 * 2  # 2 · output elements · k·k·C/groups
    assert counted["native"] == {"conv": 3 * forward, "dot": 0.0}
    if stride == 1:
      assert counted["xla"] == counted["native"]

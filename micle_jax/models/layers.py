"""The building blocks every model uses: one convolution layer of our own, and BatchNorm.

Every convolution of the ResNet goes through `Conv` and every BatchNorm through `batch_norm`,
so that a faster implementation for one backend can be dropped in without touching the
architecture. On the CPU (`kernel_platform() == "cpu"`):
- where the native library is built (`make native`), every float32 convolution runs in oneDNN
  through XLA FFI calls (`native_conv`);
- without it, a strided 3×3 convolution runs as a matmul over its patches, with its own gradient
  (`cpu_conv`), and the others in XLA;
- BatchNorm in training has a hand-written gradient (`BatchNorm`): one pass for the two
  parameter gradients and one for the input's, where XLA's derivative of Flax's BatchNorm
  leaves more, larger fusions;
- max pooling is a maximum of strided slices with a gradient of slices and pads (`max_pool`).
A 1×1 convolution not given to oneDNN is a matmul over the channel axis (~3× faster gradient than
`lax.conv` on the CPU; XLA lowers both alike on TPU/GPU, so this one is used everywhere).
GPU and TPU keep XLA's convolution, Flax's BatchNorm and `nn.max_pool`. Every CPU path equals
the others to float rounding (tests/models/test_native_conv.py, test_cpu_conv.py,
test_layers.py).
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from micle_jax.models import cpu_conv, native_conv

Dtype = Any

# SimCLR's `tf.variance_scaling_initializer()`: scale 1, fan-in, truncated normal.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# SimCLR's heads: `tf.random_normal_initializer(stddev=0.01)`.
dense_kernel_init = nn.initializers.normal(stddev=0.01)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


_platform_override: list[str] = []


def kernel_platform() -> str:
  """The platform whose kernels `Conv` and `batch_norm` use: JAX's default backend, unless
  overridden."""
  return _platform_override[-1] if _platform_override else jax.default_backend()


@contextlib.contextmanager
def override_kernel_platform(platform: str) -> Iterator[None]:
  """Models traced inside take `platform`'s kernels (tests, the benchmark).

  Only tracing reads it: a function already compiled keeps the path it was traced with.
  """
  _platform_override.append(platform)
  try:
    yield
  finally:
    _platform_override.pop()


def use_native_conv(platform: str, dtype: Dtype) -> bool:
  """Whether `Conv` computes its convolution (any kernel size) with oneDNN (`native_conv`) on
  `platform`: on the CPU, in float32, where the library is built."""
  return platform == "cpu" and jnp.dtype(dtype) == jnp.float32 and native_conv.available()


def fixed_padding(x: jnp.ndarray, kernel_size: int) -> jnp.ndarray:
  """Pads H and W of an NHWC tensor like SimCLR's `fixed_padding` (independent of input size)."""
  before, after = cpu_conv.fixed_padding_amounts(kernel_size)
  return jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


class Conv(nn.Module):
  """A bias-free 2-D convolution with SimCLR's padding rule, NHWC / HWIO.

  Strided convolutions pad by `kernel_size - 1` (split as in SimCLR) and then run VALID; stride-1
  convolutions run SAME. A 1×1 convolution is computed as a matmul over the channel axis (a
  strided one slices first), which is numerically the same as `lax.conv` and faster on CPU. On
  the CPU, a strided 3×3 float32 convolution is a matmul over its patches with its own gradient
  (`cpu_conv.strided_conv`, equal to `lax.conv` to float rounding).

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    strides: square stride.
    dtype: compute dtype; the kernel is stored in float32.
  """

  features: int
  kernel_size: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = self.kernel_size, self.strides
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if use_native_conv(kernel_platform(), self.dtype):
      return native_conv.conv(x, kernel, s)
    if k == 1:
      if s > 1:
        x = x[:, ::s, ::s, :]
      return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    if cpu_conv.use_patches(kernel_platform(), k, s, self.dtype):
      return cpu_conv.strided_conv(x, kernel, s)
    if s > 1:
      x = fixed_padding(x, k)
      padding = "VALID"
    else:
      padding = "SAME"
    return lax.conv_general_dilated(
      x, kernel, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _pool_geometry(side: int, window: int, strides: int, symmetric: bool) -> tuple[int, int, int]:
  """Padding before, after and output side of one axis of max pooling: TensorFlow's 'SAME' (as
  `lax.padtype_to_pads`), or PyTorch's `padding=window // 2` on both ends (`symmetric`), of which
  only the part the last window reaches is returned as `after`."""
  if symmetric:
    before = window // 2
    out = (side + 2 * before - window) // strides + 1
    return before, max((out - 1) * strides + window - side - before, 0), out
  out = -(-side // strides)
  total = max((out - 1) * strides + window - side, 0)
  return total // 2, total - total // 2, out


def _pool_taps(x: jax.Array, window: int, strides: int, symmetric: bool) -> list[jax.Array]:
  """The window's taps of the -inf-padded NHWC input, each [N, Ho, Wo, C], in row-major order."""
  lo_h, hi_h, ho = _pool_geometry(x.shape[1], window, strides, symmetric)
  lo_w, hi_w, wo = _pool_geometry(x.shape[2], window, strides, symmetric)
  padded = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)), constant_values=-jnp.inf)
  return [
    padded[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides]
    for i in range(window)
    for j in range(window)
  ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_taps(x: jax.Array, window: int, strides: int, symmetric: bool) -> jax.Array:
  """Max pooling as the maximum of its taps; the gradient goes to each window's first maximum
  in row-major order, as XLA's select-and-scatter gradient of `nn.max_pool` does."""
  return functools.reduce(jnp.maximum, _pool_taps(x, window, strides, symmetric))


def _max_pool_forward(x, window, strides, symmetric):
  return _max_pool_taps(x, window, strides, symmetric), x


def _max_pool_backward(window, strides, symmetric, x, dy):
  taps = _pool_taps(x, window, strides, symmetric)
  y = functools.reduce(jnp.maximum, taps)
  lo_h, hi_h, ho = _pool_geometry(x.shape[1], window, strides, symmetric)
  lo_w, hi_w, wo = _pool_geometry(x.shape[2], window, strides, symmetric)
  side_h, side_w = x.shape[1] + lo_h + hi_h, x.shape[2] + lo_w + hi_w
  zero = jnp.zeros((), dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  d_padded = None
  for index, tap in enumerate(taps):
    i, j = divmod(index, window)
    chosen = (tap == y) & ~taken
    taken = taken | chosen
    # The transpose of the strided slice: the tap's gradient back at rows i, i + s, ... by padding.
    config = (
      (0, 0, 0),
      (i, side_h - i - strides * (ho - 1) - 1, strides - 1),
      (j, side_w - j - strides * (wo - 1) - 1, strides - 1),
      (0, 0, 0),
    )
    placed = lax.pad(jnp.where(chosen, dy, zero), zero, config)
    d_padded = placed if d_padded is None else d_padded + placed
  return (d_padded[:, lo_h : lo_h + x.shape[1], lo_w : lo_w + x.shape[2]],)


_max_pool_taps.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool(x: jax.Array, window: int, strides: int, *, symmetric: bool = False) -> jax.Array:
  """`nn.max_pool(x, (window,) * 2, (strides,) * 2, padding="SAME")` on NHWC input, or with
  `symmetric` PyTorch's `nn.MaxPool2d(window, strides, padding=window // 2)` (torchvision's stem),
  which pads both ends where 'SAME' pads an even side only at the end.

  On the CPU it is the maximum of the window's strided slices, with a gradient of slices and
  pads (`_max_pool_taps`): XLA's CPU gradient of `nn.max_pool` builds index arrays the size of
  the padded input and a variadic reduce-window: 0.39 s of a 7.4 s ResNet-50 step at 224 px. The
  values and gradients are the same, ties included (tests/models/test_layers.py).
  """
  if kernel_platform() == "cpu":
    return _max_pool_taps(x, window, strides, symmetric)
  if symmetric:
    pads = [_pool_geometry(side, window, strides, True)[:2] for side in x.shape[1:3]]
    return nn.max_pool(x, (window, window), (strides, strides), padding=pads)
  return nn.max_pool(x, (window, window), (strides, strides), padding="SAME")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _normalize(x, mean, var, scale, bias, epsilon):
  """(x - mean) · rsqrt(var + ε) · scale + bias, whose gradient treats mean and var as the batch
  statistics of x (so that it is the gradient of training-mode BatchNorm)."""
  return _normalize_forward(x, mean, var, scale, bias, epsilon)[0]


def _normalize_forward(x, mean, var, scale, bias, epsilon):
  inv = lax.rsqrt(var + epsilon)
  return (x - mean) * (inv * scale) + bias, (x, mean, inv, scale)


def _normalize_backward(epsilon, residuals, dy):
  del epsilon  # already in the residuals' inv
  x, mean, inv, scale = residuals
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (x - mean) * inv
  d_bias = jnp.sum(dy, axes)
  d_scale = jnp.sum(dy * x_hat, axes)
  dx = (scale * inv) * (dy - d_bias / count - x_hat * (d_scale / count))
  zero = jnp.zeros_like(mean)
  return dx, zero, zero, d_scale, d_bias


_normalize.defvjp(_normalize_forward, _normalize_backward)


class BatchNorm(nn.Module):
  """Flax's `nn.BatchNorm` over the last axis (same variables, statistics and outputs), with
  a hand-written training gradient: `batch_norm` uses it on the CPU.

  Attributes: as `nn.BatchNorm`'s of the same names.
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    scale = self.param("scale", self.scale_init, features, jnp.float32)
    bias = (
      self.param("bias", nn.initializers.zeros, features, jnp.float32)
      if self.use_bias
      else jnp.zeros(features, jnp.float32)
    )
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
      y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
      return y.astype(self.dtype)
    axes = tuple(range(x.ndim - 1))
    stats_of = lax.stop_gradient(x)  # the statistics' gradient is in _normalize_backward
    mean = jnp.mean(stats_of, axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(stats_of), axes) - jnp.square(mean))  # as Flax
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return _normalize(x, mean, var, scale, bias, self.epsilon).astype(self.dtype)


def batch_norm(
  train: bool,
  *,
  dtype: Dtype,
  zero_init: bool = False,
  center: bool = True,
  name: str | None = None,
) -> nn.Module:
  """SimCLR's BatchNorm: momentum 0.9, ε 1e-5, statistics over the (global) batch.

  Under `jax.jit` on a batch sharded over devices, the batch mean is a global reduction, so the
  statistics cover every device and host without an explicit `axis_name`. On the CPU this is
  our `BatchNorm` (a faster gradient), elsewhere Flax's; the variables are the same.

  Args:
    train: normalise with batch statistics (and update the running ones) if True.
    dtype: compute dtype; parameters and statistics stay float32.
    zero_init: start γ at 0 (the last BatchNorm of each residual block).
    center: learn β (the last projection-head layer has none).
    name: module name.
  """
  module = BatchNorm if kernel_platform() == "cpu" else nn.BatchNorm
  return module(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    use_bias=center,
    scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
    name=name,
  )

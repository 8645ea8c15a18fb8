"""The building blocks every model uses: one convolution layer of our own, and BatchNorm.

Every convolution of the ResNet goes through `Conv`, so that a faster implementation for one
backend can be dropped in without touching the architecture: on a CPU a 1×1
convolution written as a matmul has a ~3× faster gradient than `lax.conv`, and XLA lowers both
alike on TPU/GPU.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any

# SimCLR's `tf.variance_scaling_initializer()`: scale 1, fan-in, truncated normal.
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# SimCLR's heads: `tf.random_normal_initializer(stddev=0.01)`.
dense_kernel_init = nn.initializers.normal(stddev=0.01)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def fixed_padding(x: jnp.ndarray, kernel_size: int) -> jnp.ndarray:
  """Pads H and W of an NHWC tensor like SimCLR's `fixed_padding` (independent of input size)."""
  pad_total = kernel_size - 1
  pad_beg = pad_total // 2
  pad_end = pad_total - pad_beg
  return jnp.pad(x, ((0, 0), (pad_beg, pad_end), (pad_beg, pad_end), (0, 0)))


class Conv(nn.Module):
  """A bias-free 2-D convolution with SimCLR's padding rule, NHWC / HWIO.

  Strided convolutions pad by `kernel_size - 1` (split as in SimCLR) and then run VALID; stride-1
  convolutions run SAME. A 1×1 convolution is computed as a matmul over the channel axis (a
  strided one slices first), which is numerically the same as `lax.conv` and faster on CPU.

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
    if k == 1:
      if s > 1:
        x = x[:, ::s, ::s, :]
      return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
    if s > 1:
      x = fixed_padding(x, k)
      padding = "VALID"
    else:
      padding = "SAME"
    return lax.conv_general_dilated(
      x, kernel, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def batch_norm(
  train: bool,
  *,
  dtype: Dtype,
  zero_init: bool = False,
  center: bool = True,
  name: str | None = None,
) -> nn.BatchNorm:
  """SimCLR's BatchNorm: momentum 0.9, ε 1e-5, statistics over the (global) batch.

  Under `jax.jit` on a batch sharded over devices, the batch mean is a global reduction, so the
  statistics cover every device and host without an explicit `axis_name`.

  Args:
    train: normalise with batch statistics (and update the running ones) if True.
    dtype: compute dtype; parameters and statistics stay float32.
    zero_init: start γ at 0 (the last BatchNorm of each residual block).
    center: learn β (the last projection-head layer has none).
    name: module name.
  """
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    use_bias=center,
    scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
    name=name,
  )

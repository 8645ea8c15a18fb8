"""Strided convolutions as matmuls over image patches, for XLA's CPU backend.

On the CPU, XLA computes a strided k×k convolution and its two gradients more slowly than a
matmul over the patches it reads (im2col). `strided_conv` computes that convolution, with
SimCLR's fixed padding, as

    forward        y  = patches(x) · W           [N·Ho·Wo, k·k·C] × [k·k·C, D]
    weight grad    dW = patches(x)ᵀ · dy         (patches recomputed, not kept)
    input grad     dx = Σ over the k·k taps of (dy · Wᵀ)[tap], scattered back at stride s

with `jax.custom_vjp`, so the backward pass is these matmuls and not XLA's own gradient. The
patches are k·k strided slices of the padded input, concatenated on the channel axis in the
kernel's HWIO order. Every operation is a slice, pad, add or matmul, so the result is the same
on every run (XLA's CPU matmuls are deterministic) and resume stays bit-identical.

Which shapes take this path was decided by measurement (docs/benchmark.md, "The CPU
convolution path"): strided 3×3 convolutions, 1.1–1.6× faster forward and backward than
`lax.conv_general_dilated` on the ResNets' shapes. Stride-1 convolutions lose (0.6–0.97×) and
stay with XLA, as does everything on GPU and TPU, and every non-float32 dtype.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

# The kernel sides and strides that run as patch matmuls on the CPU (see the module docstring).
PATCH_KERNELS = (3,)


def fixed_padding_amounts(kernel_size: int) -> tuple[int, int]:
  """SimCLR's padding before and after a strided convolution: k - 1 split, the extra after."""
  total = kernel_size - 1
  return total // 2, total - total // 2


def use_patches(platform: str, kernel_size: int, strides: int, dtype: jnp.dtype) -> bool:
  """Whether `layers.Conv` computes this convolution with `strided_conv` on `platform`."""
  return (
    platform == "cpu"
    and strides > 1
    and kernel_size in PATCH_KERNELS
    and jnp.dtype(dtype) == jnp.float32
  )


def _output_side(side: int, strides: int) -> int:
  """Output side of a k×k convolution after SimCLR's fixed padding (k - 1 in all): ⌈side / s⌉."""
  return (side - 1) // strides + 1


def _patches(x: jax.Array, kernel_size: int, strides: int) -> jax.Array:
  """[N, Ho, Wo, k·k·C]: the padded input's k×k windows at stride `strides`, tap-major."""
  before, after = fixed_padding_amounts(kernel_size)
  padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
  ho = _output_side(x.shape[1], strides)
  wo = _output_side(x.shape[2], strides)
  taps = [
    padded[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides]
    for i in range(kernel_size)
    for j in range(kernel_size)
  ]
  return jnp.concatenate(taps, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strided_conv(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """NHWC × HWIO convolution with SimCLR's fixed padding, = `lax.conv` of the padded input."""
  return _forward(x, kernel, strides)[0]


def _forward(x, kernel, strides):
  k, _, c, d = kernel.shape
  y = jnp.einsum("nhwp,pd->nhwd", _patches(x, k, strides), kernel.reshape(k * k * c, d))
  return y, (x, kernel)


def _backward(strides, residuals, dy):
  x, kernel = residuals
  k, _, c, d = kernel.shape
  dw = jnp.einsum("nhwp,nhwd->pd", _patches(x, k, strides), dy).reshape(kernel.shape)
  d_patches = jnp.einsum("nhwd,pd->nhwp", dy, kernel.reshape(k * k * c, d))
  before, after = fixed_padding_amounts(k)
  side_h, side_w = x.shape[1] + before + after, x.shape[2] + before + after
  ho, wo = dy.shape[1], dy.shape[2]
  zero = jnp.zeros((), dy.dtype)
  d_padded = None
  for i in range(k):
    for j in range(k):
      tap = d_patches[..., (i * k + j) * c : (i * k + j + 1) * c]
      # The transpose of the strided slice: put the tap back at rows i, i + s, ... by padding.
      config = (
        (0, 0, 0),
        (i, side_h - i - strides * (ho - 1) - 1, strides - 1),
        (j, side_w - j - strides * (wo - 1) - 1, strides - 1),
        (0, 0, 0),
      )
      placed = lax.pad(tap, zero, config)
      d_padded = placed if d_padded is None else d_padded + placed
  dx = d_padded[:, before : before + x.shape[1], before : before + x.shape[2]]
  return dx, dw


strided_conv.defvjp(_forward, _backward)

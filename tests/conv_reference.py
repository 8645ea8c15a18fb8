"""A float64 NumPy convolution and its gradients, for the CPU convolution paths' tests.

The padding is `layers.Conv`'s: (k - 1) // 2 before and the rest after, on both spatial axes.
"""

import numpy as np


def reference(x, w, stride):
  """float64 NumPy: the padded input's k×k taps, each a matmul; gradients of 0.5‖y‖²·r."""
  k = w.shape[0]
  before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
  xp = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
  ho = (xp.shape[1] - k) // stride + 1
  wo = (xp.shape[2] - k) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(k):
    for j in range(k):
      y += xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride] @ w[i, j]
  return y, xp, (before, ho, wo)


def reference_grads(x, w, stride, dy):
  y, xp, (before, ho, wo) = reference(x, w, stride)
  k = w.shape[0]
  dw = np.zeros_like(w)
  dxp = np.zeros_like(xp)
  for i in range(k):
    for j in range(k):
      window = (slice(None), slice(i, i + stride * ho, stride), slice(j, j + stride * wo, stride))
      dw[i, j] = np.einsum("nhwc,nhwd->cd", xp[window], dy)
      dxp[window] += dy @ w[i, j].T
  dx = dxp[:, before : before + x.shape[1], before : before + x.shape[2]]
  return y, dx, dw


def relative(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def assert_matches(ours, xla, expected) -> None:
  """y, dx, dw of a CPU path, of `lax.conv` and of float64: each pair within 1e-5 relative."""
  for name, p, q, e in zip(("y", "dx", "dw"), ours, xla, expected, strict=True):
    assert p.shape == q.shape == e.shape, name
    assert relative(p, e) < 1e-5, f"{name} vs float64: {relative(p, e):.1e}"
    assert relative(p, np.asarray(q, np.float64)) < 1e-5, f"{name} vs lax.conv"
    assert relative(q, e) < 1e-5, f"{name}: lax.conv vs float64"  # the reference is right

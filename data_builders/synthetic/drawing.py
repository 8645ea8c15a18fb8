"""Numpy drawing primitives for the synthetic images: coordinate grids, soft shapes, encoding.

Images are drawn as float arrays in [0, 1] on a normalised grid (y in [-1, 1] top to bottom, x
scaled by the aspect ratio), so a shape looks the same at any resolution.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (y, x) float32 [H, W] coordinates: y in [-1, 1], x in [-W/H, W/H]."""
  y = np.linspace(-1.0, 1.0, height, dtype=np.float32)
  x = np.linspace(-1.0, 1.0, width, dtype=np.float32) * (width / height)
  return np.meshgrid(y, x, indexing="ij")


def jitter(
  y: np.ndarray,
  x: np.ndarray,
  rng: np.random.Generator,
  *,
  max_shift: float = 0.06,
  max_degrees: float = 6.0,
  zoom: tuple[float, float] = (0.93, 1.07),
) -> tuple[np.ndarray, np.ndarray]:
  """Applies a random small shift, rotation and zoom to the coordinate grid."""
  angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
  scale = rng.uniform(*zoom)
  dy, dx = rng.uniform(-max_shift, max_shift, size=2)
  cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
  return cos * y - sin * x + dy, sin * y + cos * x + dx


def soft_ellipse(
  y: np.ndarray,
  x: np.ndarray,
  center: tuple[float, float],
  radii: tuple[float, float],
  softness: float = 0.04,
) -> np.ndarray:
  """Returns a [0, 1] mask of an axis-aligned ellipse with a soft (sigmoid) edge."""
  r = np.sqrt(((y - center[0]) / radii[0]) ** 2 + ((x - center[1]) / radii[1]) ** 2)
  return sigmoid((1.0 - r) / softness)


def sigmoid(z: np.ndarray) -> np.ndarray:
  """Numerically safe logistic function."""
  return 0.5 * (1.0 + np.tanh(0.5 * np.clip(z, -60.0, 60.0)))


def gaussian(y: np.ndarray, x: np.ndarray, center: tuple[float, float], sigma: float) -> np.ndarray:
  """Returns an isotropic Gaussian bump with peak 1."""
  return np.exp(-((y - center[0]) ** 2 + (x - center[1]) ** 2) / (2.0 * sigma**2))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int = 6) -> np.ndarray:
  """Returns smooth random texture in [0, 1]: a `cells`² random lattice, bilinearly upsampled."""
  lattice = rng.uniform(size=(cells + 1, cells + 1)).astype(np.float32)
  fy = np.linspace(0, cells, shape[0], dtype=np.float32)
  fx = np.linspace(0, cells, shape[1], dtype=np.float32)
  y0 = np.minimum(fy.astype(int), cells - 1)
  x0 = np.minimum(fx.astype(int), cells - 1)
  wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
  top = lattice[y0][:, x0] * (1 - wx) + lattice[y0][:, x0 + 1] * wx
  bottom = lattice[y0 + 1][:, x0] * (1 - wx) + lattice[y0 + 1][:, x0 + 1] * wx
  return top * (1 - wy) + bottom * wy


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Clips a float image in [0, 1] and converts it to uint8 [H, W, C] (adds C=1 for 2-D)."""
  image = np.clip(image, 0.0, 1.0) * 255.0 + 0.5
  image = image.astype(np.uint8)
  return image[..., None] if image.ndim == 2 else image


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
  """Encodes a uint8 [H, W, 1 or 3] image as JPEG (deterministic bytes)."""
  return tf.io.encode_jpeg(image, quality=quality).numpy()


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W, 1 or 3] image as PNG (deterministic bytes)."""
  return tf.io.encode_png(image).numpy()


def plane_noise(
  seed: int, u: np.ndarray, v: np.ndarray, *, frequency: float, extent: float = 3.0
) -> np.ndarray:
  """Smooth noise in [0, 1] defined on a plane, not on a pixel grid.

  A random lattice of `frequency` cells per unit over [-extent, extent]² (seeded by `seed`),
  bilinearly interpolated at the coordinates (u, v): any grid that samples the same points of the
  plane gets the same values, so a texture drawn this way moves with whatever (u, v) follow.
  """
  cells = int(np.ceil(2 * extent * frequency)) + 2
  lattice = np.random.default_rng(seed).uniform(size=(cells, cells)).astype(np.float32)
  fu = np.clip((u + extent) * frequency, 0.0, cells - 1.001)
  fv = np.clip((v + extent) * frequency, 0.0, cells - 1.001)
  iu, iv = fu.astype(int), fv.astype(int)
  wu, wv = fu - iu, fv - iv
  top = lattice[iu, iv] * (1 - wv) + lattice[iu, iv + 1] * wv
  bottom = lattice[iu + 1, iv] * (1 - wv) + lattice[iu + 1, iv + 1] * wv
  return (top * (1 - wu) + bottom * wu).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Blurs a float [H, W, C] image with a separable Gaussian of `sigma` pixels (edges repeated)."""
  if sigma <= 0.05:
    return image
  radius = max(1, int(np.ceil(3 * sigma)))
  taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
  taps = (taps / taps.sum()).astype(np.float32)
  padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  rows = sum(t * padded[i : i + image.shape[0]] for i, t in enumerate(taps))
  return sum(t * rows[:, i : i + image.shape[1]] for i, t in enumerate(taps))

"""Synthetic dermoscopy-like skin lesions whose colour, shape and texture depend on the class.

The generative model, and why each factor is there (MICLe's positive pair is two photographs of
one lesion, SimCLR's two augmentations of one photograph):

- **Per class** (`CLASS_STYLE`): colour, border irregularity, texture strength and asymmetry,
  plus a pale centre (df) or vessels (bcc): the diagnostic signal, which every image of a lesion
  shares.
- **Per lesion** (`Lesion`, drawn once per case): skin tone, radius, border wobble, elongation
  and the texture pattern itself. Shared by a case's images, so they agree on more than the
  class: an identity signal that instance discrimination can use and diagnosis cannot. The
  texture lives on the lesion (`texture`: drawn at the lesion's own coordinates), so it turns,
  shifts and scales with it: two photos of a lesion in different poses share no texture pixels.
- **Per image** (`render`): rotation (any angle), shift, zoom (0.85-1.15), skin mottling,
  overall brightness (±12%) and sensor noise, as repeat photographs of one lesion differ. These
  are the nuisances MICLe's pairs teach invariance to without augmentation having to imitate
  them. No hair or ruler artefacts are drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_builders.synthetic import drawing

# HAM10000 classes -> (RGB colour, border irregularity, texture strength, asymmetry).
CLASS_STYLE: dict[str, tuple[tuple[float, float, float], float, float, float]] = {
  "akiec": ((0.78, 0.42, 0.38), 0.10, 0.35, 0.15),  # red, scaly
  "bcc": ((0.86, 0.66, 0.68), 0.06, 0.15, 0.10),  # pink, pearly (vessels added below)
  "bkl": ((0.62, 0.48, 0.32), 0.08, 0.45, 0.10),  # light brown, waxy texture
  "df": ((0.55, 0.38, 0.28), 0.03, 0.05, 0.05),  # brown with a pale centre
  "mel": ((0.22, 0.14, 0.12), 0.22, 0.30, 0.35),  # dark, irregular, asymmetric
  "nv": ((0.45, 0.30, 0.20), 0.03, 0.08, 0.03),  # brown, round, uniform
  "vasc": ((0.62, 0.12, 0.30), 0.07, 0.10, 0.08),  # red-purple lobules
}
CLASSES: tuple[str, ...] = tuple(CLASS_STYLE)


@dataclasses.dataclass(frozen=True)
class Lesion:
  """Appearance shared by all images of one case."""

  dx: str
  skin: tuple[float, float, float]
  radius: float
  harmonics: tuple[float, ...]  # border wobble amplitudes of harmonics 2..6
  phases: tuple[float, ...]
  stretch: float
  seed: int  # seeds the lesion's texture (on the lesion plane), the same for all its images


def sample_lesion(dx: str, rng: np.random.Generator) -> Lesion:
  """Draws one lesion of class `dx` (one of `CLASSES`)."""
  _, irregularity, _, asymmetry = CLASS_STYLE[dx]
  tone = rng.uniform(0.55, 0.92)
  return Lesion(
    dx=dx,
    skin=(tone, tone * rng.uniform(0.72, 0.82), tone * rng.uniform(0.6, 0.72)),
    radius=rng.uniform(0.35, 0.6),
    harmonics=tuple(rng.uniform(0, irregularity, 5) + [asymmetry, 0, 0, 0, 0]),
    phases=tuple(rng.uniform(0, 2 * np.pi, 5)),
    stretch=rng.uniform(0.75, 1.0),
    seed=int(rng.integers(2**31)),
  )


def texture(lesion: Lesion, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """The lesion's texture in [-0.5, 0.5] at the lesion-plane coordinates (y, x): about ten cells
  across a photo, a function of the plane (not of the pixel grid), seeded by the lesion."""
  return drawing.plane_noise(lesion.seed, y, x, frequency=5.0) - 0.5


def render(lesion: Lesion, *, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """Draws one photograph of `lesion` as uint8 [height, width, 3]."""
  y, x = drawing.jitter(*drawing.grid(height, width), rng, max_degrees=180.0, zoom=(0.85, 1.15))
  colour, _, strength, _ = CLASS_STYLE[lesion.dx]
  angle = np.arctan2(y, x)
  wobble = sum(
    a * np.cos((k + 2) * angle + p)
    for k, (a, p) in enumerate(zip(lesion.harmonics, lesion.phases, strict=True))
  )
  r = np.sqrt(y**2 + (x * lesion.stretch) ** 2) / (lesion.radius * (1.0 + wobble))
  inside = drawing.sigmoid((1.0 - r) / 0.06)
  lesion_rgb = np.array(colour, np.float32) * (1.0 + strength * texture(lesion, y, x)[..., None])
  if lesion.dx == "df":
    lesion_rgb = lesion_rgb + 0.3 * drawing.gaussian(y, x, (0.0, 0.0), 0.12)[..., None]
  if lesion.dx == "bcc":
    vessels = np.cos(18 * (x + 0.3 * np.sin(5 * y)))[..., None] ** 16 * np.array([0.2, -0.2, -0.2])
    lesion_rgb = lesion_rgb + vessels
  skin = (
    np.array(lesion.skin, np.float32)
    * (1.0 + 0.05 * (drawing.smooth_noise(rng, y.shape) - 0.5))[..., None]
  )
  image = skin * (1 - inside[..., None]) + lesion_rgb * inside[..., None]
  vignette = 1.0 - 0.35 * np.clip(np.sqrt(y**2 + x**2) - 0.9, 0.0, None)
  image = image * vignette[..., None] * rng.uniform(0.88, 1.12) + rng.normal(0, 0.015, image.shape)
  return drawing.to_uint8(image)

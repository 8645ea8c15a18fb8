"""Synthetic chest X-rays: patient-specific anatomy plus visible signs of each finding.

Bright = dense (bone, heart, fluid), dark = air (lungs), as on a real radiograph. Every
competition condition changes something a model can learn: Cardiomegaly widens the heart
silhouette, Pleural Effusion fills a lung base up to a meniscus (blunting the angle),
Consolidation adds patchy dense blobs, Edema a bilateral perihilar haze with basal lines,
Atelectasis a raised hemidiaphragm with a plate-like band; Support Devices draw a tube and
Nodule/Mass a round opacity. A finding's strength (1 positive, ~0.5 uncertain) scales its sign.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from data_builders.synthetic import drawing

VISIBLE_FINDINGS = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Pleural Effusion",
  "Support Devices",
  "Nodule",
)


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """Geometry shared by all images of one patient."""

  body: float  # overall body size
  lung_width: float
  lung_height: float
  lung_gap: float
  heart: float  # heart size before any cardiomegaly
  rib_frequency: float
  side: int  # side of most unilateral findings, -1 or +1


@dataclasses.dataclass(frozen=True)
class Exposure:
  """How one image was acquired: drawn afresh for every image (a per-image nuisance)."""

  tissue: float  # soft-tissue brightness
  air: float  # lung brightness
  gamma: float
  gain: float
  noise: float  # standard deviation of the additive pixel noise


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  """Draws one patient's anatomy."""
  return Anatomy(
    body=rng.uniform(0.85, 1.05),
    lung_width=rng.uniform(0.24, 0.32),
    lung_height=rng.uniform(0.48, 0.62),
    lung_gap=rng.uniform(0.08, 0.13),
    heart=rng.uniform(0.9, 1.0),
    rib_frequency=rng.uniform(4.5, 6.0),
    side=int(rng.choice([-1, 1])),
  )


def sample_exposure(rng: np.random.Generator) -> Exposure:
  """Draws one image's exposure: contrast between tissue and air, gamma and overall gain."""
  return Exposure(
    tissue=rng.uniform(0.4, 0.65),
    air=rng.uniform(0.05, 0.25),
    gamma=rng.uniform(0.7, 1.4),
    gain=rng.uniform(0.85, 1.15),
    noise=rng.uniform(0.01, 0.04),
  )


# The frontal heart silhouette's half-width (before cardiomegaly, × the patient's heart size)
# and how much a certain Cardiomegaly (strength 1) widens it on frontal and lateral views.
_HEART_HALF_WIDTH = 0.27
_WIDENING_FRONTAL = 0.7
_WIDENING_LATERAL = 0.6


def cardiothoracic_ratio(a: Anatomy, findings: Mapping[str, float]) -> float:
  """The frontal view's heart width over its thorax width (outer edges of the lungs), as drawn.

  What a radiologist measures for cardiomegaly (> 0.5 on a PA film): here 0.32-0.48
  without it and 0.54-0.82 with a certain one (strength 1). Zoom and body size cancel out.
  """
  heart_scale = a.heart * (1.0 + _WIDENING_FRONTAL * findings.get("Cardiomegaly", 0.0))
  return _HEART_HALF_WIDTH * heart_scale / (a.lung_gap + 2 * a.lung_width)


def _lungs(y, x, a: Anatomy, findings: Mapping[str, float]) -> tuple[np.ndarray, list]:
  """Returns the lung mask (both sides) and per-side (mask, center, radii)."""
  sides = []
  total = np.zeros_like(y)
  for side in (-1, 1):
    center = (-0.08 * a.body, side * (a.lung_gap + a.lung_width) * a.body)
    radii = (a.lung_height * a.body, a.lung_width * a.body)
    raise_dome = 0.18 * findings.get("Atelectasis", 0.0) * (side == a.side)
    dome = center[0] + 0.72 * radii[0] - raise_dome - 0.18 * (1 - ((x - center[1]) / radii[1]) ** 2)
    mask = drawing.soft_ellipse(y, x, center, radii) * drawing.sigmoid((dome - y) / 0.03)
    sides.append((mask, center, radii))
    total = np.maximum(total, mask)
  return total, sides


def _frontal(y, x, a: Anatomy, e: Exposure, findings: Mapping[str, float], rng) -> np.ndarray:
  body = drawing.soft_ellipse(y, x, (0.1, 0.0), (1.1 * a.body, 0.78 * a.body), 0.06)
  image = 0.04 + (e.tissue - 0.04) * body
  lungs, sides = _lungs(y, x, a, findings)
  ribs = np.maximum(0.0, np.cos(2 * np.pi * a.rib_frequency * (y + 0.3 * x**2) / 2)) ** 6
  image = image - (e.tissue - e.air) * lungs + 0.08 * ribs * lungs
  spine = drawing.sigmoid((0.07 - np.abs(x)) / 0.015) * body
  image = np.maximum(image, 0.62 * spine) + _lung_findings(y, x, sides, lungs, a, e, findings, rng)
  heart_scale = a.heart * (1.0 + _WIDENING_FRONTAL * findings.get("Cardiomegaly", 0.0))
  heart = drawing.soft_ellipse(
    y,
    x,
    (0.22 * a.body, 0.1 * a.body),
    (0.26 * a.heart * a.body, _HEART_HALF_WIDTH * heart_scale * a.body),
  )
  return image * (1 - heart) + 0.66 * heart


def _lateral(y, x, a: Anatomy, e: Exposure, findings: Mapping[str, float], rng) -> np.ndarray:
  body = drawing.soft_ellipse(y, x, (0.1, 0.0), (1.1 * a.body, 0.62 * a.body), 0.06)
  image = 0.04 + (e.tissue - 0.04) * body
  center, radii = (-0.05 * a.body, 0.0), (0.66 * a.lung_height / 0.55 * a.body, 0.45 * a.body)
  dome = center[0] + 0.7 * radii[0] - 0.15 * (1 - (x / radii[1]) ** 2)
  lung = drawing.soft_ellipse(y, x, center, radii) * drawing.sigmoid((dome - y) / 0.03)
  image = image - (e.tissue - e.air) * lung
  spine = drawing.sigmoid((0.08 - np.abs(x - 0.45 * a.body)) / 0.015) * body
  image = np.maximum(image, 0.6 * spine * (0.8 + 0.2 * np.cos(14 * y) ** 2))
  image = image + _lung_findings(y, x, [(lung, center, radii)], lung, a, e, findings, rng)
  heart_scale = a.heart * (1.0 + _WIDENING_LATERAL * findings.get("Cardiomegaly", 0.0))
  heart = drawing.soft_ellipse(
    y, x, (0.25 * a.body, -0.2 * a.body), (0.27 * a.heart * a.body, 0.22 * heart_scale * a.body)
  )
  return image * (1 - heart) + 0.64 * heart


def _lung_findings(y, x, sides, lungs, a: Anatomy, e: Exposure, findings, rng) -> np.ndarray:
  """Returns the brightness added inside the lungs by effusion, consolidation, edema, etc."""
  added = np.zeros_like(y)
  mask, center, radii = sides[0] if len(sides) == 1 or a.side < 0 else sides[1]
  if (s := findings.get("Pleural Effusion", 0.0)) > 0:
    level = center[0] + radii[0] * (0.6 - 0.65 * s) - 0.12 * ((x - center[1]) / radii[1]) ** 2
    fluid = drawing.sigmoid((y - level) / 0.025) * mask
    added += (e.tissue + 0.05 - e.air) * fluid
  if (s := findings.get("Consolidation", 0.0)) > 0:
    patch = drawing.smooth_noise(rng, y.shape, 8)
    for _ in range(rng.integers(2, 4)):
      dy, dx = rng.uniform(-0.4, 0.4), rng.uniform(-0.5, 0.5)
      spot = (center[0] + dy * radii[0], center[1] + dx * radii[1])
      added += 0.45 * s * drawing.gaussian(y, x, spot, 0.1) * (0.5 + patch) * mask
  if (s := findings.get("Edema", 0.0)) > 0:
    haze = sum(drawing.gaussian(y, x, (c[0] + 0.1, c[1] * 0.6), 0.3) for _, c, _ in sides)
    kerley = np.cos(2 * np.pi * 12 * y) ** 8 * drawing.sigmoid((y - 0.2) / 0.05)
    added += s * (0.22 * haze + 0.1 * kerley) * lungs
  if (s := findings.get("Atelectasis", 0.0)) > 0:
    band = np.exp(-(((y - center[0] - 0.25 * radii[0] - 0.25 * (x - center[1])) / 0.035) ** 2))
    added += 0.45 * s * band * mask
  if (s := findings.get("Nodule", 0.0)) > 0:
    spot = (center[0] - 0.2 * radii[0], center[1] + 0.2 * radii[1])
    added += 0.35 * s * drawing.soft_ellipse(y, x, spot, (0.07, 0.07), 0.1) * mask
  if findings.get("Support Devices", 0.0) > 0:
    path = 0.04 + 0.15 * np.clip(y + 0.8, 0, None) ** 2
    added += 0.5 * np.exp(-(((x - path) / 0.012) ** 2)) * (y > -1.0) * (y < 0.25)
  return added


def render(
  anatomy: Anatomy,
  findings: Mapping[str, float],
  *,
  lateral: bool,
  height: int,
  width: int,
  rng: np.random.Generator,
  exposure: Exposure | None = None,
) -> np.ndarray:
  """Draws one chest X-ray as uint8 [height, width, 1].

  Args:
    anatomy: the patient's geometry (shared across their images).
    findings: finding name (see `VISIBLE_FINDINGS`) -> strength in [0, 1]; others are ignored.
    lateral: draw a lateral view instead of a frontal one.
    height: image height in pixels.
    width: image width in pixels.
    rng: source of the per-image exposure and noise (`sample_exposure`) and of the patient's
      positioning on this image (shift, rotation, zoom).
    exposure: this image's exposure, drawn by the caller with `sample_exposure(rng)` just before
      (the same draws as leaving it None), e.g. to record it; None draws it here.
  """
  if exposure is None:
    exposure = sample_exposure(rng)
  y, x = drawing.jitter(
    *drawing.grid(height, width), rng, max_shift=0.12, max_degrees=12.0, zoom=(0.85, 1.15)
  )
  draw = _lateral if lateral else _frontal
  image = np.clip(draw(y, x, anatomy, exposure, findings, rng), 0.0, 1.0) ** exposure.gamma
  image = image * exposure.gain + rng.normal(0.0, exposure.noise, image.shape)
  return drawing.to_uint8(image)

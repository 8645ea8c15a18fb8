"""What each synthetic skin condition looks like, in the lesion's own coordinates.

A condition is a colour, a morphology (one patch, a ring, a group of papules, a nodule, a streak)
and a surface texture. `draw_lesion` evaluates a lesion at skin-plane coordinates (u, v), so a
lesion's texture moves, tilts and shrinks with the lesion when a photo is taken from elsewhere: no
two photos of it share texture pixels. The conditions and their looks follow the commonest
teledermatology complaints; "other" mixes four rarer ones, as a clinic's catch-all class does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_builders.synthetic import drawing


@dataclasses.dataclass(frozen=True)
class Look:
  """How a condition is drawn.

  Attributes:
    colour: RGB of the lesion where it is opaque.
    opacity: how much of the skin the lesion covers at its centre (skin tone shows through).
    morphology: "patch", "ring", "papules", "nodule" or "streak".
    size: (min, max) radius in skin units (an image is about 2 units high at distance 1).
    softness: width of the border (0.02 sharp, 0.3 ill-defined).
    texture: "smooth", "blotchy", "scale", "fissure", "dots", "vessels" or "pustules".
    irregularity: border wobble amplitude.
    sites: body sites where the condition is photographed.
  """

  colour: tuple[float, float, float]
  opacity: float
  morphology: str
  size: tuple[float, float]
  softness: float
  texture: str
  irregularity: float
  sites: tuple[str, ...]


# fmt: off
# name: colour, opacity, morphology, size, softness, texture, irregularity, body sites
LOOKS: dict[str, Look] = {
  "eczema": Look((0.80, 0.36, 0.32), 0.6, "patch", (0.55, 0.9), 0.3, "blotchy", 0.3,
                 ("arm", "leg", "hand", "neck", "face")),
  "acne": Look((0.82, 0.30, 0.28), 0.9, "papules", (0.55, 0.85), 0.05, "pustules", 0.1,
               ("face", "back", "chest")),
  "psoriasis": Look((0.86, 0.38, 0.40), 0.9, "patch", (0.45, 0.8), 0.03, "scale", 0.15,
                    ("arm", "leg", "back", "scalp")),
  "seborrheic_keratosis": Look((0.40, 0.28, 0.18), 0.9, "patch", (0.25, 0.45), 0.03, "fissure",
                               0.12, ("back", "chest", "face")),
  "melanocytic_nevus": Look((0.28, 0.18, 0.12), 0.95, "patch", (0.12, 0.25), 0.03, "smooth",
                            0.04, ("back", "chest", "arm", "face")),
  "verruca_vulgaris": Look((0.85, 0.80, 0.72), 0.9, "papules", (0.3, 0.5), 0.04, "dots", 0.2,
                           ("hand", "foot")),
  "tinea": Look((0.80, 0.42, 0.36), 0.85, "ring", (0.45, 0.8), 0.06, "scale", 0.1,
                ("chest", "back", "leg", "foot")),
  "urticaria": Look((0.96, 0.74, 0.74), 0.75, "papules", (0.6, 0.9), 0.1, "smooth", 0.3,
                    ("arm", "back", "chest", "leg")),
  "basal_cell_carcinoma": Look((0.94, 0.70, 0.72), 0.9, "nodule", (0.2, 0.35), 0.04, "vessels",
                               0.08, ("face", "neck", "scalp")),
}
# The rarer conditions a clinic labels "other".
OTHER_LOOKS: dict[str, Look] = {
  "vitiligo": Look((0.97, 0.92, 0.86), 0.9, "patch", (0.45, 0.9), 0.1, "smooth", 0.3,
                   ("hand", "face", "arm")),
  "lentigo": Look((0.55, 0.40, 0.28), 0.75, "patch", (0.15, 0.35), 0.06, "smooth", 0.2,
                  ("face", "hand", "arm")),
  "skin_tag": Look((0.72, 0.56, 0.46), 0.9, "nodule", (0.08, 0.15), 0.03, "smooth", 0.05,
                   ("neck", "chest")),
  "scar": Look((0.90, 0.74, 0.70), 0.7, "streak", (0.45, 0.8), 0.05, "smooth", 0.05,
               ("arm", "leg", "chest", "back")),
}
# fmt: on
# Papules: (count range, radius range in units of the lesion's radius). Textured papules (acne's
# pustules, a wart's dots) come many and small; smooth ones (urticaria's wheals) few and large.
PAPULES = {False: ((5, 12), (0.12, 0.22)), True: ((2, 4), (0.3, 0.5))}
OTHER = "other"
CONDITIONS: tuple[str, ...] = (*LOOKS, OTHER)
# Per body site: hair density (hairs per unit area of skin) and a tint of the skin.
SITES: dict[str, tuple[float, tuple[float, float, float]]] = {
  "face": (0.5, (1.03, 0.97, 0.97)),
  "scalp": (12.0, (1.0, 1.0, 1.0)),
  "neck": (0.5, (1.0, 0.98, 0.98)),
  "chest": (2.0, (1.0, 1.0, 1.0)),
  "back": (1.0, (0.98, 0.98, 0.98)),
  "arm": (4.0, (1.0, 0.99, 0.97)),
  "hand": (1.0, (1.04, 1.0, 0.98)),
  "leg": (5.0, (0.99, 0.98, 0.97)),
  "foot": (0.2, (1.06, 1.02, 1.0)),
}


@dataclasses.dataclass(frozen=True)
class Lesion:
  """One lesion: drawn once, photographed one or more times.

  Attributes:
    look: its condition's look.
    site: the body site it is on.
    radius: its size in skin units.
    stretch: elongation of its shape (1 round).
    angle: orientation of its shape on the skin.
    harmonics: border wobble amplitudes (harmonics 2..6).
    phases: border wobble phases.
    papules: centres (u, v) and radii of its papules (papules morphology), in units of `radius`.
    seed: seeds its texture and the hairs around it, evaluated on the skin plane.
  """

  look: Look
  site: str
  radius: float
  stretch: float
  angle: float
  harmonics: tuple[float, ...]
  phases: tuple[float, ...]
  papules: tuple[tuple[float, float, float], ...]
  seed: int


def sample_lesion(look: Look, site: str, rng: np.random.Generator) -> Lesion:
  """Draws one lesion with `look` on `site`."""
  papules = ()
  if look.morphology == "papules":
    (low, high), (small, large) = PAPULES[look.texture == "smooth"]
    papules = tuple(
      (
        float(rng.uniform(-0.9, 0.9)),
        float(rng.uniform(-0.9, 0.9)),
        float(rng.uniform(small, large)),
      )
      for _ in range(int(rng.integers(low, high + 1)))
    )
  return Lesion(
    look=look,
    site=site,
    radius=float(rng.uniform(*look.size)),
    stretch=float(rng.uniform(0.6, 1.0)),
    angle=float(rng.uniform(0, np.pi)),
    harmonics=tuple(float(h) for h in rng.uniform(0, look.irregularity, 5)),
    phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 5)),
    papules=papules,
    seed=int(rng.integers(2**31)),
  )


def _blob(u: np.ndarray, v: np.ndarray, lesion: Lesion, softness: float) -> np.ndarray:
  """The lesion's outline as a soft [0, 1] mask (1 inside), in lesion units (radius 1)."""
  angle = np.arctan2(v, u)
  wobble = sum(
    a * np.cos((k + 2) * angle + p)
    for k, (a, p) in enumerate(zip(lesion.harmonics, lesion.phases, strict=True))
  )
  r = np.sqrt(u**2 + v**2) / (1.0 + wobble)
  return drawing.sigmoid((1.0 - r) / max(softness, 1e-3))


def _shape(u: np.ndarray, v: np.ndarray, lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
  """(mask, highlight) of the lesion's morphology at lesion coordinates (radius 1)."""
  look = lesion.look
  soft = look.softness / lesion.radius * 0.1 + 0.02
  highlight = np.zeros_like(u)
  if look.morphology == "patch":
    return _blob(u, v, lesion, soft), highlight
  if look.morphology == "ring":
    outer = _blob(u, v, lesion, soft)
    inner = _blob(u / 0.62, v / 0.62, lesion, soft)
    return np.clip(outer - 0.8 * inner, 0.0, 1.0), highlight
  if look.morphology == "papules":
    mask = np.zeros_like(u)
    for cu, cv, r in lesion.papules:
      d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2) / r
      mask = np.maximum(mask, drawing.sigmoid((1.0 - d) / (soft + 0.05)))
      highlight = np.maximum(highlight, np.exp(-(d**2) / 0.08))
    return mask, highlight
  if look.morphology == "nodule":
    mask = _blob(u, v, lesion, soft)
    highlight = np.exp(-((u + 0.3) ** 2 + (v + 0.3) ** 2) / 0.08)  # a shiny, raised surface
    return mask, highlight
  if look.morphology == "streak":
    d = np.maximum(np.abs(v) / 0.12, np.abs(u))
    return drawing.sigmoid((1.0 - d) / (soft + 0.05)), highlight
  raise ValueError(f"unknown morphology {look.morphology!r}")


def draw_lesion(u: np.ndarray, v: np.ndarray, lesion: Lesion) -> tuple[np.ndarray, np.ndarray]:
  """(rgb [H, W, 3], alpha [H, W]) of `lesion` at skin-plane coordinates (u, v), centred on it.

  The texture is value noise on the lesion's own plane (seeded by `lesion.seed`), so it is a
  property of the lesion, not of a photo's pixel grid.
  """
  look = lesion.look
  cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
  lu = (cos * u + sin * v) / lesion.radius
  lv = (-sin * u + cos * v) / (lesion.radius * lesion.stretch)
  mask, highlight = _shape(lu, lv, lesion)
  colour = np.array(look.colour, np.float32)
  rgb = np.broadcast_to(colour, (*u.shape, 3)).copy()
  noise = drawing.plane_noise(lesion.seed, lu, lv, frequency=4.0, extent=4.0)
  fine = drawing.plane_noise(lesion.seed + 1, lu, lv, frequency=12.0, extent=4.0)
  alpha = mask * look.opacity
  if look.texture == "scale":  # silvery-white flakes
    mid = drawing.plane_noise(lesion.seed + 2, lu, lv, frequency=8.0, extent=4.0)
    flakes = (0.7 * np.clip((mid - 0.5) * 3.0, 0.0, 1.0))[..., None]
    rgb = rgb * (1 - flakes) + flakes * np.array([0.92, 0.9, 0.88])
  elif look.texture == "blotchy":  # ill-defined erythema
    rgb *= (0.85 + 0.3 * fine)[..., None]
    alpha = alpha * (0.5 + 0.7 * noise)
  elif look.texture == "fissure":  # waxy, cracked surface
    cracks = np.exp(-(((noise - 0.5) / 0.05) ** 2))
    rgb *= (1.0 - 0.5 * cracks)[..., None]
    rgb *= (0.85 + 0.3 * fine)[..., None]
  elif look.texture == "dots":  # rough surface with thrombosed capillaries
    rgb *= (0.8 + 0.35 * fine)[..., None]
    dots = np.clip((fine - 0.78) * 8.0, 0, 1)
    rgb = rgb * (1 - dots[..., None]) + dots[..., None] * np.array([0.25, 0.1, 0.1])
  elif look.texture == "vessels":  # telangiectasia over a pearly surface
    vessels = np.exp(-(((noise - 0.5) / 0.03) ** 2))
    rgb = rgb * (1 - 0.8 * vessels[..., None]) + 0.8 * vessels[..., None] * np.array(
      [0.75, 0.1, 0.15]
    )
  elif look.texture == "pustules":  # white-yellow heads on red papules
    rgb = rgb * (1 - highlight[..., None]) + highlight[..., None] * np.array([0.98, 0.95, 0.8])
  else:
    rgb *= (0.93 + 0.14 * noise)[..., None]
  if look.morphology == "nodule":
    rgb += 0.25 * highlight[..., None]
  return np.clip(rgb, 0.0, 1.0), np.clip(alpha, 0.0, 1.0)

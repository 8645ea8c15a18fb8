"""Synthetic teledermatology: camera photos of skin conditions, grouped into cases, from two clinics.

The generative model, stated so that tests can check it and a study can be read against it
(MICLe's positive pair is two photos of one case, SimCLR's two augmentations of one photo):

- **Per case**: one condition (`CONDITION_PROBS`: nine conditions and `other`, imbalanced as a
  clinic's caseload is; `other` is one of four rarer conditions), one patient, and 1-6 photos
  (`PHOTO_COUNTS`: most cases have one or two). The condition is the label.
- **Per patient**: skin tone (a clinic's own distribution, light to dark), age and sex. A patient
  may have two cases (`SECOND_CASE`), which share the tone.
- **Per lesion** (`skin_conditions.sample_lesion`): the condition's colour, morphology and
  texture, and the lesion's own size, shape, orientation, body site, hairs and texture pattern,
  all drawn on the skin plane in the lesion's own coordinates.
- **Per photo**: another view of a lesion of the case or, with probability `ANOTHER_LESION` for
  each further photo, another lesion of the same condition at a body site other than the previous
  lesion's. And what a camera and a room add,
  none of which SimCLR's augmentation produces: perspective tilt, distance and rotation of the
  camera; directional light, ambient level and a flash highlight; the device's white balance,
  focus blur, sensor noise and JPEG quality; background objects (a clothing edge, a ruler).
  A photo comes from the case's device with probability `SAME_DEVICE`, else from a device drawn
  at random among the clinic's (the case's own included), each shot with its own exposure.
- **Per clinic** (`make_clinic`): its devices, lighting and the skin tones of its patients. The
  `external` clinic has other devices (cooler white balance, more blur and noise, lower JPEG
  quality), dimmer and more directional light and darker skin tones: a distribution shift of
  the kind the paper evaluates on, with the same conditions.

Prediction for SimCLR vs MICLe. SimCLR's two views of a photo share everything above that
augmentation does not change, so instance discrimination can tell photos apart by their
perspective, light, background and device. MICLe's two photos of a case share the condition, the
patient's skin tone and, usually, the device (white balance, noise, blur range), and differ in
the per-photo camera, light and background and, often, in the lesion itself (a new lesion for
30% of further photos, so more than 30% of a case's pairs once it has three photos or more).
MICLe should therefore learn features that depend more on the condition and less on the photo: a
higher top-1 accuracy after fine-tuning with few labels, and a smaller drop at the external
clinic, as far as that drop comes from camera and light (its darker skin tones are a shift that
MICLe's pairs, sharing a patient's tone, do not teach). The effect is bounded by the cases with
several photos (about 58% of cases).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from data_builders.synthetic import drawing, skin_conditions

CONDITION_PROBS: dict[str, float] = {
  "eczema": 0.2,
  "acne": 0.12,
  "psoriasis": 0.1,
  "seborrheic_keratosis": 0.09,
  "melanocytic_nevus": 0.08,
  "verruca_vulgaris": 0.06,
  "tinea": 0.05,
  "urticaria": 0.05,
  "basal_cell_carcinoma": 0.04,
  skin_conditions.OTHER: 0.21,
}
assert tuple(CONDITION_PROBS) == skin_conditions.CONDITIONS
PHOTO_COUNTS = np.array([0.42, 0.26, 0.14, 0.09, 0.06, 0.03])  # P(1..6 photos in a case)
ANOTHER_LESION = 0.3  # a further photo shows another lesion of the condition
SAME_DEVICE = 0.8  # a photo comes from the case's device (else any of the clinic's, at random)
SECOND_CASE = 0.1  # a patient has a second case
LIGHT_SKIN = np.array([0.93, 0.78, 0.68], np.float32)
DARK_SKIN = np.array([0.36, 0.24, 0.17], np.float32)
SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class Device:
  """A camera: its white balance (RGB gains), sensor noise, focus blur (pixels), JPEG quality
  range and aspect ratio (width / height)."""

  name: str
  white_balance: tuple[float, float, float]
  noise: float
  blur: float
  jpeg_quality: tuple[int, int]
  aspect: float


@dataclasses.dataclass(frozen=True)
class Clinic:
  """Where photos are taken: devices, light, and its patients' skin tones (a Beta over light to
  dark)."""

  name: str
  devices: tuple[Device, ...]
  skin_tone: tuple[float, float]
  ambient: tuple[float, float]
  directional: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Patient:
  patient_id: str
  tone: float  # 0 light .. 1 dark
  age: int
  sex: str

  @property
  def skin(self) -> np.ndarray:
    return (1.0 - self.tone) * LIGHT_SKIN + self.tone * DARK_SKIN

  @property
  def fitzpatrick(self) -> int:
    return 1 + min(5, int(self.tone * 6))


@dataclasses.dataclass(frozen=True)
class Photo:
  """One photo's camera, light and background (image units: the image is 2 high)."""

  rotation: float
  tilt: tuple[float, float]
  distance: float
  offset: tuple[float, float]
  ambient: float
  light_angle: float
  light_strength: float
  flash: tuple[float, float, float]  # (y, x, strength); strength 0: none
  white_balance: tuple[float, float, float]
  clothing: tuple[float, float, tuple[float, float, float]] | None  # (angle, distance, rgb)
  ruler: int  # image edge 0-3 with a ruler, -1 none
  blur: float
  noise: float
  jpeg_quality: int
  seed: int


@dataclasses.dataclass(frozen=True)
class Shot:
  """A photo of a case: which lesion, from which device, how."""

  lesion: skin_conditions.Lesion
  lesion_index: int
  device: Device
  photo: Photo


def make_clinic(name: str, rng: np.random.Generator, *, external: bool = False) -> Clinic:
  """Draws a clinic's devices; `external` shifts devices, light and skin tones (module doc)."""
  devices = []
  for index in range(3 if external else 5):
    base = np.array([0.9, 1.0, 1.12]) if external else np.ones(3)
    gains = base * (1.0 + rng.normal(0.0, 0.03 if external else 0.05, 3))
    devices.append(
      Device(
        name=f"{name}-{index}",
        white_balance=tuple(float(g) for g in gains / gains.mean()),
        noise=float(rng.uniform(0.02, 0.04) if external else rng.uniform(0.008, 0.02)),
        blur=float(rng.uniform(0.5, 1.2) if external else rng.uniform(0.0, 0.5)),
        jpeg_quality=(45, 70) if external else (80, 95),
        aspect=float(rng.choice([1.0, 4 / 3])),
      )
    )
  return Clinic(
    name=name,
    devices=tuple(devices),
    skin_tone=(4.0, 2.5) if external else (2.0, 4.0),
    ambient=(0.65, 0.92) if external else (0.85, 1.08),
    directional=(0.2, 0.55) if external else (0.0, 0.35),
  )


def sample_patient(patient_id: str, clinic: Clinic, rng: np.random.Generator) -> Patient:
  return Patient(
    patient_id=patient_id,
    tone=float(rng.beta(*clinic.skin_tone)),
    age=int(rng.integers(2, 90)),
    sex=str(rng.choice(["female", "male"])),
  )


def sample_photo(device: Device, clinic: Clinic, rng: np.random.Generator) -> Photo:
  """Draws a photo's camera, light and background (module doc)."""
  jitter = device.white_balance * (1.0 + rng.normal(0.0, 0.03, 3))  # the shot's auto white balance
  flash = (0.0, 0.0, 0.0)
  if rng.uniform() < 0.25:
    flash = (
      float(rng.uniform(-0.6, 0.6)),
      float(rng.uniform(-0.6, 0.6)),
      float(rng.uniform(0.2, 0.5)),
    )
  clothing = None
  if rng.uniform() < 0.25:
    colour = tuple(float(c) for c in rng.uniform(0.05, 0.9, 3))
    clothing = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.55, 0.9)), colour)
  return Photo(
    rotation=float(rng.uniform(0, 2 * np.pi)),
    tilt=(float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.35, 0.35))),
    distance=float(rng.uniform(0.6, 1.3)),
    offset=(float(rng.uniform(-0.2, 0.2)), float(rng.uniform(-0.2, 0.2))),
    ambient=float(rng.uniform(*clinic.ambient)),
    light_angle=float(rng.uniform(0, 2 * np.pi)),
    light_strength=float(rng.uniform(*clinic.directional)),
    flash=flash,
    white_balance=tuple(float(g) for g in jitter),
    clothing=clothing,
    ruler=int(rng.integers(4)) if rng.uniform() < 0.15 else -1,
    blur=device.blur + float(rng.uniform(0.0, 0.5)),
    noise=device.noise,
    jpeg_quality=int(rng.integers(device.jpeg_quality[0], device.jpeg_quality[1] + 1)),
    seed=int(rng.integers(2**31)),
  )


def sample_case(condition: str, clinic: Clinic, rng: np.random.Generator) -> list[Shot]:
  """Draws a case of `condition`: its lesions and the 1-6 shots of them (module doc)."""
  if condition == skin_conditions.OTHER:
    others = list(skin_conditions.OTHER_LOOKS.values())
    look = others[int(rng.integers(len(others)))]
  else:
    look = skin_conditions.LOOKS[condition]
  lesions = [skin_conditions.sample_lesion(look, str(rng.choice(look.sites)), rng)]
  case_device = clinic.devices[int(rng.integers(len(clinic.devices)))]
  shots = []
  for k in range(int(rng.choice(np.arange(1, 7), p=PHOTO_COUNTS))):
    if k > 0 and rng.uniform() < ANOTHER_LESION:
      sites = [s for s in look.sites if s != lesions[-1].site] or list(look.sites)
      lesions.append(skin_conditions.sample_lesion(look, str(rng.choice(sites)), rng))
      index = len(lesions) - 1
    else:
      index = int(rng.integers(len(lesions))) if k > 0 else 0
    device = case_device
    if rng.uniform() >= SAME_DEVICE:
      device = clinic.devices[int(rng.integers(len(clinic.devices)))]
    shots.append(Shot(lesions[index], index, device, sample_photo(device, clinic, rng)))
  return shots


@dataclasses.dataclass(frozen=True)
class Case:
  """A case: its id, clinic, condition (the label), patient, split and shots."""

  case_id: str
  clinic: str
  condition: str
  patient: Patient
  split: str
  shots: tuple[Shot, ...]


def sample_cases(
  clinic: Clinic,
  num_cases: int,
  rng: np.random.Generator,
  split_of: Callable[[np.random.Generator], str],
) -> Iterator[Case]:
  """Draws `num_cases` cases of `clinic`'s patients (a patient's cases share `split_of`'s split)."""
  conditions = list(CONDITION_PROBS)
  probs = list(CONDITION_PROBS.values())
  index = 0
  while index < num_cases:
    patient = sample_patient(f"{clinic.name}-p{index:05d}", clinic, rng)
    split = split_of(rng)
    for _ in range(2 if rng.uniform() < SECOND_CASE else 1):
      if index == num_cases:
        break
      condition = str(rng.choice(conditions, p=probs))
      shots = tuple(sample_case(condition, clinic, rng))
      yield Case(f"{clinic.name}-c{index:05d}", clinic.name, condition, patient, split, shots)
      index += 1


def camera_to_skin(y: np.ndarray, x: np.ndarray, photo: Photo) -> tuple[np.ndarray, np.ndarray]:
  """Skin-plane coordinates (u, v), centred on the lesion, seen at image coordinates (y, x):
  a perspective tilt, then the camera's distance, rotation and offset."""
  w = 1.0 + photo.tilt[0] * y + photo.tilt[1] * x
  yp, xp = y / w, x / w
  cos, sin = np.cos(photo.rotation), np.sin(photo.rotation)
  u = photo.distance * (cos * yp - sin * xp) + photo.offset[0]
  v = photo.distance * (sin * yp + cos * xp) + photo.offset[1]
  return u, v


def _hairs(u: np.ndarray, v: np.ndarray, lesion: skin_conditions.Lesion) -> np.ndarray:
  """[0, 1] cover of the hairs around a lesion, drawn on the skin plane (its site's density)."""
  density, _ = skin_conditions.SITES[lesion.site]
  own = np.random.default_rng(lesion.seed + 7)
  count = min(25, int(own.poisson(density * 4.0)))
  cover = np.zeros_like(u)
  for _ in range(count):
    start = own.uniform(-1.5, 1.5, 2)
    angle = own.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    length = own.uniform(0.2, 0.6)
    du, dv = u - start[0], v - start[1]
    t = np.clip(du * direction[0] + dv * direction[1], 0.0, length)
    distance = np.sqrt((du - t * direction[0]) ** 2 + (dv - t * direction[1]) ** 2)
    cover = np.maximum(cover, drawing.sigmoid((0.008 - distance) / 0.003))
  return cover


def _background(y: np.ndarray, x: np.ndarray, photo: Photo, image: np.ndarray) -> np.ndarray:
  """Adds the photo's clothing edge and ruler, in image coordinates."""
  if photo.clothing is not None:
    angle, distance, colour = photo.clothing
    along = np.cos(angle) * y + np.sin(angle) * x
    cloth = drawing.sigmoid((along - distance) / 0.02)[..., None]
    weave = 0.9 + 0.1 * np.cos(60 * (np.sin(angle) * y - np.cos(angle) * x))[..., None]
    image = image * (1 - cloth) + cloth * np.array(colour, np.float32) * weave
  if photo.ruler >= 0:
    coordinate = [y, -y, x / np.abs(x).max(), -x / np.abs(x).max()][photo.ruler]
    across = [x, x, y, y][photo.ruler]
    strip = (coordinate > 0.8)[..., None]
    ticks = (np.cos(np.pi * across / 0.05) > 0.85) & (coordinate > 0.9)
    ruler = np.where(ticks[..., None], 0.15, 1.0) * np.array([0.93, 0.9, 0.78], np.float32)
    image = np.where(strip, ruler, image)
  return image


def render(
  lesion: skin_conditions.Lesion,
  patient: Patient,
  photo: Photo,
  *,
  height: int,
  aspect: float = 1.0,
) -> np.ndarray:
  """Draws one photo of `lesion` on `patient`'s skin as uint8 [height, round(height·aspect), 3]
  (before JPEG: the writer encodes it at `photo.jpeg_quality`)."""
  width = int(round(height * aspect))
  y, x = drawing.grid(height * SUPERSAMPLE, width * SUPERSAMPLE)
  u, v = camera_to_skin(y, x, photo)
  _, tint = skin_conditions.SITES[lesion.site]
  mottling = drawing.plane_noise(lesion.seed + 3, u, v, frequency=3.0, extent=4.0)
  skin = patient.skin * np.array(tint, np.float32) * (0.95 + 0.1 * mottling)[..., None]
  rgb, alpha = skin_conditions.draw_lesion(u, v, lesion)
  image = skin * (1 - alpha[..., None]) + rgb * alpha[..., None]
  hair = _hairs(u, v, lesion)[..., None]
  image = image * (1 - 0.85 * hair) + 0.85 * hair * np.array([0.12, 0.09, 0.07], np.float32)
  image = _background(y, x, photo, image)
  light = photo.ambient * (
    1.0
    + 0.5 * photo.light_strength * (np.cos(photo.light_angle) * y + np.sin(photo.light_angle) * x)
  )
  fy, fx, strength = photo.flash
  image = image * light[..., None] + strength * drawing.gaussian(y, x, (fy, fx), 0.25)[..., None]
  image = image * np.array(photo.white_balance, np.float32)
  image = image.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE, 3).mean(axis=(1, 3))
  image = drawing.gaussian_blur(image, photo.blur)
  noise = np.random.default_rng(photo.seed).normal(0.0, photo.noise, image.shape)
  return drawing.to_uint8(image + noise)

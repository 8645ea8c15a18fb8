"""Typed view recipes (SimCLR, chest X-ray, dermatology) built from the ops in `augment`.

A view is a `ViewPreset`: a frozen dataclass of plain, typed fields rather than a string
mini-language, so a typo fails at construction. `pretrain_view` turns one image (encoded bytes or
a decoded HWC tensor) and one shape-[2] stateless seed into one augmented view; `finetune_train` and
`eval_preprocess` are the supervised counterparts. All return float32 [size, size, 3] in [0, 1].

Order of a view: random resized crop (decoding only the crop of a JPEG) → horizontal flip →
rotation → colour jitter → grayscale → Gaussian blur. Rotation runs on the size×size crop, so its
uncovered corners are black (`augment.rotate` with fill_mode="constant").
"""

import dataclasses

import tensorflow as tf

from micle_jax import specs
from micle_jax.data import augment, augment_photometric


@dataclasses.dataclass(frozen=True)
class ViewPreset:
  """One augmentation recipe; the defaults are SimCLR's ImageNet view.

  Attributes:
    crop_area_range: random-resized-crop area, as a fraction of the image area (SimCLR's
      `min_object_covered=0.1` also keeps it at least 0.1).
    crop_aspect_ratio_range: random-resized-crop width / height.
    flip: horizontal flip with p = 0.5.
    jitter_strength: colour strength s (brightness/contrast/saturation 0.8s, hue 0.2s); 0 = off.
    jitter_p: probability of applying the colour jitter.
    grayscale_p: probability of converting to grayscale.
    blur_p: probability of a Gaussian blur with σ ~ U(0.1, 2), kernel ≈ 10% of the side.
    rotation_degrees: rotate by U[-d, d] degrees (black corners); 0 = off.
  """

  crop_area_range: tuple[float, float] = (0.08, 1.0)
  crop_aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  jitter_strength: float = 1.0
  jitter_p: float = 0.8
  grayscale_p: float = 0.2
  blur_p: float = 0.5
  rotation_degrees: float = 0.0

  def __post_init__(self):
    low, high = self.crop_area_range
    if not 0.0 < low <= high <= 1.0:
      raise ValueError(f"crop_area_range must satisfy 0 < low <= high <= 1, got {(low, high)}")
    low, high = self.crop_aspect_ratio_range
    if not 0.0 < low <= high:
      raise ValueError(f"crop_aspect_ratio_range must satisfy 0 < low <= high, got {(low, high)}")
    for name in ("jitter_p", "grayscale_p", "blur_p"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.jitter_strength < 0 or self.rotation_degrees < 0:
      raise ValueError("jitter_strength and rotation_degrees must be >= 0")


PRESETS: dict[str, ViewPreset] = {
  # SimCLR (Chen et al. 2020), blur included as at ImageNet scale.
  "simclr": ViewPreset(),
  # Azizi et al. 2021 for CheXpert: crop, rotation up to 45°, colour jitter s = 0.5, flip, no
  # blur. Grayscale is off: X-rays are gray already (replicated to 3 channels).
  "cxr": ViewPreset(jitter_strength=0.5, grayscale_p=0.0, blur_p=0.0, rotation_degrees=45.0),
  # Dermatology: SimCLR's view plus a mild ±20° rotation (lesions have no canonical orientation;
  # larger angles would mostly add black corners to the crop).
  "derm": ViewPreset(rotation_degrees=20.0),
  # Chest X-rays at 32–64 px (the CPU demo): crops of at least 60% of the image, ±10°, jitter
  # s = 0.4. At that size the 224 px recipe's 8% crops and ±45° rotations leave two views, and
  # above all two images of one patient (MICLe), with almost nothing in common to match on.
  "cxr_small": ViewPreset(
    crop_area_range=(0.6, 1.0),
    jitter_strength=0.4,
    grayscale_p=0.0,
    blur_p=0.0,
    rotation_degrees=10.0,
  ),
  # Skin photos at 32–64 px (the CPU dermatology study): crops of at least 30% of the photo, jitter
  # s = 0.5, no grayscale, ±20°. At that size 8% crops mostly miss the lesion, and full-strength
  # jitter with grayscale erases the colour that tells the conditions apart. Chosen on synthetic
  # data of another generator seed than the study reports (docs/study_derm.md).
  "derm_small": ViewPreset(
    crop_area_range=(0.3, 1.0),
    jitter_strength=0.5,
    grayscale_p=0.0,
    blur_p=0.0,
    rotation_degrees=20.0,
  ),
}

# Fine-tuning views: random resized crop + flip; dermatology adds a light colour jitter
# (s = 0.25: brightness/contrast/saturation ±0.2, hue ±0.05) to cover camera colour variation.
FINETUNE_PRESETS: dict[str, ViewPreset] = {
  "simclr": ViewPreset(jitter_strength=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
  "cxr": ViewPreset(jitter_strength=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
  "cxr_small": ViewPreset(jitter_strength=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
  "derm": ViewPreset(jitter_strength=0.25, jitter_p=0.8, grayscale_p=0.0, blur_p=0.0),
  "derm_small": ViewPreset(jitter_strength=0.25, jitter_p=0.8, grayscale_p=0.0, blur_p=0.0),
}

assert set(PRESETS) == set(FINETUNE_PRESETS) == set(specs.PRESETS), "presets of the schema"


def _lookup(preset: ViewPreset | str, table: dict[str, ViewPreset]) -> ViewPreset:
  if isinstance(preset, ViewPreset):
    return preset
  if preset not in table:
    raise ValueError(f"unknown augmentation preset {preset!r}; valid: {sorted(table)}")
  return table[preset]


def get_preset(preset: ViewPreset | str) -> ViewPreset:
  """Returns `preset` itself, or the pretraining preset of that name.

  Raises:
    ValueError: if the name is not a key of `PRESETS` (the message lists the valid names).
  """
  return _lookup(preset, PRESETS)


def _is_encoded(image_or_bytes: tf.Tensor) -> bool:
  return tf.convert_to_tensor(image_or_bytes).dtype == tf.string


def _apply_view(
  image_or_bytes: tf.Tensor, seed: tf.Tensor, preset: ViewPreset, size: int
) -> tf.Tensor:
  """Runs `preset` on one image; one sub-seed per op, fixed whatever the preset enables."""
  crop_seed, flip_seed, rotate_seed, jitter_seed, gray_seed, blur_seed = augment.split_seed(seed, 6)
  crop_kwargs = dict(
    size=size,
    area_range=preset.crop_area_range,
    aspect_ratio_range=preset.crop_aspect_ratio_range,
  )
  if _is_encoded(image_or_bytes):
    image = augment.decode_and_random_resized_crop(image_or_bytes, crop_seed, **crop_kwargs)
  else:
    image = augment.random_resized_crop(image_or_bytes, crop_seed, **crop_kwargs)
  if preset.flip:
    image = augment.random_flip(image, flip_seed)
  if preset.rotation_degrees > 0:
    image = augment.random_rotate(image, rotate_seed, max_degrees=preset.rotation_degrees)
  if preset.jitter_strength > 0:
    image = augment_photometric.random_color_jitter(
      image, jitter_seed, strength=preset.jitter_strength, p=preset.jitter_p
    )
  if preset.grayscale_p > 0:
    image = augment_photometric.random_grayscale(image, gray_seed, p=preset.grayscale_p)
  if preset.blur_p > 0:
    image = augment_photometric.random_gaussian_blur(image, blur_seed, p=preset.blur_p)
  image.set_shape([size, size, 3])
  return image


@tf.autograph.experimental.do_not_convert
def pretrain_view(
  encoded_or_decoded: tf.Tensor, seed: tf.Tensor, *, preset: ViewPreset | str, size: int
) -> tf.Tensor:
  """One self-supervised view of an image.

  Args:
    encoded_or_decoded: scalar string tensor of JPEG/PNG bytes (JPEGs decode only the crop), or a
      decoded HWC image (float32 in [0, 1] or uint8), 1 or 3 channels.
    seed: shape-[2] int32/int64 stateless seed; it alone determines the view.
    preset: a `ViewPreset` or a name in `PRESETS` ("simclr", "cxr", "derm").
    size: output side in pixels.

  Returns:
    float32 [size, size, 3] in [0, 1].

  Raises:
    ValueError: for an unknown preset name.
  """
  return _apply_view(encoded_or_decoded, seed, get_preset(preset), size)


@tf.autograph.experimental.do_not_convert
def finetune_train(
  image_or_bytes: tf.Tensor, seed: tf.Tensor, *, size: int, preset: ViewPreset | str
) -> tf.Tensor:
  """Supervised fine-tuning view: random resized crop + flip (+ light colour jitter for derm).

  Args:
    image_or_bytes: encoded bytes or a decoded HWC image, as for `pretrain_view`.
    seed: shape-[2] stateless seed.
    size: output side in pixels.
    preset: a `ViewPreset` or a name in `FINETUNE_PRESETS` ("simclr", "cxr", "derm").

  Returns:
    float32 [size, size, 3] in [0, 1].

  Raises:
    ValueError: for an unknown preset name.
  """
  return _apply_view(image_or_bytes, seed, _lookup(preset, FINETUNE_PRESETS), size)


# Evaluation views. Photos (SimCLR, dermatology): SimCLR's centred square crop of 87.5% of the
# shorter side. Chest X-rays: the whole image. A centre square of a portrait radiograph would
# drop a quarter of its height, the costophrenic angles where effusions show among it, while
# training crops cover the whole film.
EVAL_CROP_FRACTIONS: dict[str, float | None] = {
  "simclr": 0.875,
  "derm": 0.875,
  "derm_small": 0.875,
  "cxr": None,
  "cxr_small": None,
}


def eval_crop_fraction(preset: str) -> float | None:
  """The evaluation crop of a preset: a centre-crop fraction, or None for the whole image."""
  if preset not in EVAL_CROP_FRACTIONS:
    raise ValueError(
      f"unknown augmentation preset {preset!r}; valid: {sorted(EVAL_CROP_FRACTIONS)}"
    )
  return EVAL_CROP_FRACTIONS[preset]


@tf.autograph.experimental.do_not_convert
def eval_preprocess(
  image_or_bytes: tf.Tensor,
  *,
  size: int,
  preset: str = "simclr",
  crop_fraction: float | None = -1.0,
) -> tf.Tensor:
  """Deterministic evaluation view: the preset's centred crop, or the whole image (chest X-rays).

  Args:
    image_or_bytes: encoded bytes (JPEGs decode only the crop) or a decoded HWC image.
    size: output side in pixels (antialiased bicubic resize, clipped to [0, 1]).
    preset: "simclr", "derm", "derm_small" (centre crop of 0.875), "cxr" or "cxr_small" (whole
      image).
    crop_fraction: overrides the preset: a centre-crop fraction of the shorter side, or None for
      the whole image; the default (-1) takes the preset's.

  Returns:
    float32 [size, size, 3] in [0, 1].
  """
  if crop_fraction is not None and crop_fraction < 0:
    crop_fraction = eval_crop_fraction(preset)
  encoded = _is_encoded(image_or_bytes)
  if crop_fraction is None:
    if encoded:
      image = augment.decode_and_resize_whole(image_or_bytes, size=size)
    else:
      image = augment.resize_whole(image_or_bytes, size=size)
  elif encoded:
    image = augment.decode_and_center_crop(image_or_bytes, size=size, crop_fraction=crop_fraction)
  else:
    image = augment.center_crop(image_or_bytes, size=size, crop_fraction=crop_fraction)
  image.set_shape([size, size, 3])
  return image

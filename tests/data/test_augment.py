"""Tests for micle_jax.data.augment, augment_photometric and augment_presets (small images, CPU)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from micle_jax.data import augment, augment_photometric, augment_presets

_SIZE = 32
_SEED = (3, 7)


def _smooth_image(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
  """A smooth random float32 image in [0, 1] (upsampled noise compresses like a photo)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0.0, 1.0, (height // 8, width // 8, channels)).astype(np.float32)
  image = tf.image.resize(small, [height, width], method="bilinear").numpy()
  return np.clip(image, 0.0, 1.0)


def _encode(image: np.ndarray, fmt: str) -> bytes:
  pixels = tf.constant(np.round(image * 255).astype(np.uint8))
  if fmt == "jpeg":  # 4:2:0 chroma subsampling, as most photos.
    return tf.io.encode_jpeg(pixels, quality=95).numpy()
  if fmt == "jpeg444":
    return tf.io.encode_jpeg(pixels, quality=95, chroma_downsampling=False).numpy()
  return tf.io.encode_png(pixels).numpy()


_RGB = _smooth_image(48, 40, 3)
_GRAY = _smooth_image(40, 48, 1, seed=1)
_JPEG = _encode(_smooth_image(64, 48, 3, seed=2), "jpeg")
_GRAY_JPEG = _encode(_smooth_image(48, 64, 1, seed=3), "jpeg")
_PNG = _encode(_smooth_image(64, 48, 3, seed=4), "png")
_JPEG444 = _encode(_smooth_image(64, 48, 3, seed=2), "jpeg444")


def _seed(a: int = _SEED[0], b: int = _SEED[1], dtype=tf.int32) -> tf.Tensor:
  return tf.constant([a, b], dtype)


def _in_tf_data(fn, *args) -> np.ndarray:
  """Runs `fn(*args)` inside a tf.data map, i.e. traced in graph mode."""
  dataset = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
  return next(iter(dataset)).numpy()


# name -> (fn(input, seed), input). Every op here is random and takes (input, seed).
_RANDOM_OPS = {
  "random_resized_crop": (lambda x, s: augment.random_resized_crop(x, s, size=_SIZE), _RGB),
  "decode_rrc_jpeg": (
    lambda x, s: augment.decode_and_random_resized_crop(x, s, size=_SIZE),
    _JPEG,
  ),
  "decode_rrc_png": (lambda x, s: augment.decode_and_random_resized_crop(x, s, size=_SIZE), _PNG),
  "random_flip": (augment.random_flip, _RGB),
  "color_jitter": (lambda x, s: augment_photometric.color_jitter(x, s, strength=1.0), _RGB),
  "random_color_jitter": (
    lambda x, s: augment_photometric.random_color_jitter(x, s, strength=1.0, p=0.5),
    _RGB,
  ),
  "random_grayscale": (lambda x, s: augment_photometric.random_grayscale(x, s, p=0.5), _RGB),
  "random_gaussian_blur": (
    lambda x, s: augment_photometric.random_gaussian_blur(x, s, p=0.5),
    _RGB,
  ),
  "random_rotate": (lambda x, s: augment.random_rotate(x, s, max_degrees=45.0), _RGB),
  "pretrain_view_simclr": (
    lambda x, s: augment_presets.pretrain_view(x, s, preset="simclr", size=_SIZE),
    _JPEG,
  ),
  "pretrain_view_cxr": (
    lambda x, s: augment_presets.pretrain_view(x, s, preset="cxr", size=_SIZE),
    _GRAY,
  ),
  "pretrain_view_derm": (
    lambda x, s: augment_presets.pretrain_view(x, s, preset="derm", size=_SIZE),
    _RGB,
  ),
  "finetune_train_derm": (
    lambda x, s: augment_presets.finetune_train(x, s, size=_SIZE, preset="derm"),
    _PNG,
  ),
}


@pytest.mark.parametrize("name", sorted(_RANDOM_OPS))
def test_eager_and_tf_data_agree_with_valid_output(name):
  fn, image = _RANDOM_OPS[name]
  seeds = [(3, 7), (11, 5), (0, 1)]
  dataset = tf.data.Dataset.from_tensor_slices(tf.constant(seeds, tf.int64))
  in_graph = [x.numpy() for x in dataset.map(lambda seed: fn(tf.constant(image), seed))]
  for seed, graph in zip(seeds, in_graph, strict=True):
    eager = fn(tf.constant(image), tf.constant(seed, tf.int64))
    assert eager.dtype == tf.float32
    eager = eager.numpy()
    assert eager.shape[-1] == 3 and eager.ndim == 3
    assert eager.min() >= 0.0 and eager.max() <= 1.0
    np.testing.assert_allclose(graph, eager, rtol=0, atol=1e-6)


def test_int32_and_int64_seeds_agree():
  for fn, image in _RANDOM_OPS.values():
    np.testing.assert_array_equal(
      fn(tf.constant(image), _seed(dtype=tf.int32)).numpy(),
      fn(tf.constant(image), _seed(dtype=tf.int64)).numpy(),
    )


@pytest.mark.parametrize("name", sorted(_RANDOM_OPS))
def test_same_seed_same_output_different_seeds_differ(name):
  fn, image = _RANDOM_OPS[name]
  first = fn(tf.constant(image), _seed()).numpy()
  np.testing.assert_array_equal(fn(tf.constant(image), _seed()).numpy(), first)
  outputs = [fn(tf.constant(image), _seed(i, 1)).numpy() for i in range(8)]
  distinct = {o.tobytes() for o in outputs}
  assert len(distinct) >= 2
  if not name.startswith("random_") or name in ("random_resized_crop", "random_rotate"):
    assert len(distinct) == len(outputs)  # Ops that always act: every seed gives a new view.


@pytest.mark.parametrize("name", sorted(_RANDOM_OPS))
def test_single_channel_input_gives_three_equal_channels(name):
  fn, image = _RANDOM_OPS[name]
  image = _GRAY_JPEG if isinstance(image, bytes) else _GRAY
  out = fn(tf.constant(image), _seed()).numpy()
  assert out.shape[-1] == 3
  # Gray stays gray under every op (saturation and hue leave it unchanged up to rounding).
  np.testing.assert_allclose(out[..., 1], out[..., 0], atol=1e-5)
  np.testing.assert_allclose(out[..., 2], out[..., 0], atol=1e-5)


def test_random_resized_crop_output_size_and_uint8_input():
  out = augment.random_resized_crop(_RGB, _seed(), size=24)
  assert out.shape == (24, 24, 3)
  from_uint8 = augment.random_resized_crop(np.round(_RGB * 255).astype(np.uint8), _seed(), size=24)
  np.testing.assert_allclose(from_uint8.numpy(), out.numpy(), atol=1 / 255)


@pytest.mark.parametrize(
  "shape,area_range,aspect_ratio_range",
  [
    ((64, 64, 3), (0.08, 1.0), (3 / 4, 4 / 3)),
    ((375, 500, 3), (0.08, 1.0), (3 / 4, 4 / 3)),
    ((375, 500, 1), (0.3, 0.5), (0.5, 2.0)),
  ],
)
def test_crop_window_within_area_and_aspect_ranges(shape, area_range, aspect_ratio_range):
  height, width = shape[:2]
  seeds = tf.data.Dataset.range(400).map(lambda i: tf.stack([i, tf.constant(9, tf.int64)]))
  windows = seeds.map(
    lambda seed: augment.random_crop_window(
      tf.constant(shape), seed, area_range=area_range, aspect_ratio_range=aspect_ratio_range
    )
  )
  areas, fallbacks = [], 0
  for window in windows.as_numpy_iterator():
    offset_y, offset_x, crop_h, crop_w = window
    assert 0 <= offset_y and offset_y + crop_h <= height
    assert 0 <= offset_x and offset_x + crop_w <= width
    if (crop_h, crop_w) == (height, width) and area_range[1] < 1.0:
      fallbacks += 1  # No window found in max_attempts: the whole image, as in SimCLR.
      continue
    area = crop_h * crop_w / (height * width)
    assert area_range[0] <= area <= area_range[1] + 1e-9
    # Width and height are rounded to pixels, so allow one pixel of slack in the ratio.
    slack = 1.0 / min(crop_h, crop_w)
    assert aspect_ratio_range[0] * (1 - slack) <= crop_w / crop_h
    assert crop_w / crop_h <= aspect_ratio_range[1] * (1 + slack)
    areas.append(area)
  assert fallbacks < 10
  assert max(areas) - min(areas) > 0.5 * (area_range[1] - max(area_range[0], 0.1))


def test_random_resized_crop_uses_the_crop_window():
  image = tf.constant(_RGB)
  y, x, h, w = augment.random_crop_window(tf.shape(image), _seed()).numpy()
  expected = tf.image.resize(_RGB[y : y + h, x : x + w], [_SIZE, _SIZE], method="bicubic")
  out = augment.random_resized_crop(image, _seed(), size=_SIZE)
  np.testing.assert_allclose(out.numpy(), np.clip(expected.numpy(), 0, 1), atol=1e-6)


@pytest.mark.parametrize(
  "encoded", [_JPEG444, _GRAY_JPEG, _PNG, _JPEG], ids=["jpeg444", "gray_jpeg", "png", "jpeg420"]
)
def test_decode_and_crop_matches_decode_then_crop(encoded):
  decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  for i in range(5):
    fast = augment.decode_and_random_resized_crop(encoded, _seed(i, 2), size=_SIZE).numpy()
    slow = augment.random_resized_crop(decoded, _seed(i, 2), size=_SIZE).numpy()
    if encoded is not _JPEG:
      np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)  # The same DCT decode.
    else:
      # With 4:2:0 chroma, a crop edge inside a chroma block upsamples chroma from the edge:
      # only the outermost pixels of the crop (≤ 2 output pixels after bicubic) may differ.
      np.testing.assert_allclose(fast[2:-2, 2:-2], slow[2:-2, 2:-2], rtol=0, atol=2 / 255)
      assert np.abs(fast - slow).mean() < 1e-3


def test_decode_and_crop_handles_one_channel_decoding():
  gray = augment.decode_and_random_resized_crop(_GRAY_JPEG, _seed(), size=_SIZE, channels=1)
  rgb = augment.decode_and_random_resized_crop(_GRAY_JPEG, _seed(), size=_SIZE, channels=3)
  native = augment.decode_and_random_resized_crop(_GRAY_JPEG, _seed(), size=_SIZE, channels=0)
  assert gray.shape == rgb.shape == native.shape == (_SIZE, _SIZE, 3)
  np.testing.assert_allclose(gray.numpy(), rgb.numpy(), atol=2 / 255)
  np.testing.assert_array_equal(native.numpy(), gray.numpy())


def test_random_flip_mirrors_or_keeps():
  image = augment.to_rgb_float(_RGB).numpy()
  flipped = 0
  for i in range(16):
    out = augment.random_flip(_RGB, _seed(i, 4)).numpy()
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 0 < flipped < 16


def test_color_jitter_strength_zero_is_identity():
  for random_order in (True, False):
    out = augment_photometric.color_jitter(_RGB, _seed(), strength=0.0, random_order=random_order)
    np.testing.assert_array_equal(out.numpy(), _RGB)
  out = augment_photometric.random_color_jitter(_RGB, _seed(), strength=0.0, p=1.0)
  np.testing.assert_array_equal(out.numpy(), _RGB)


def test_color_jitter_changes_colour_and_order_is_seeded():
  fixed = augment_photometric.color_jitter(_RGB, _seed(), strength=1.0, random_order=False).numpy()
  assert np.abs(fixed - _RGB).max() > 0.01
  # A seed fixes the four factors whatever the order, so a shuffled run differs from the fixed
  # order exactly when the seeded permutation is not the identity (p = 23/24 per seed).
  differs = [
    not np.array_equal(
      augment_photometric.color_jitter(_RGB, _seed(i, 3), strength=1.0).numpy(),
      augment_photometric.color_jitter(_RGB, _seed(i, 3), strength=1.0, random_order=False).numpy(),
    )
    for i in range(4)
  ]
  assert any(differs)
  with pytest.raises(ValueError, match="strength"):
    augment_photometric.color_jitter(_RGB, _seed(), strength=-1.0)


def test_grayscale_has_equal_channels_and_luma():
  out = augment_photometric.random_grayscale(_RGB, _seed(), p=1.0).numpy()
  luma = _RGB @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  for channel in range(3):
    np.testing.assert_allclose(out[..., channel], luma, atol=1e-4)
  np.testing.assert_array_equal(
    augment_photometric.random_grayscale(_RGB, _seed(), p=0.0).numpy(), _RGB
  )


def _blur_reference(image: np.ndarray, sigma: float) -> np.ndarray:
  """Float64 reference: separable Gaussian, 2·(side // 20) + 1 taps, reflect padding."""
  radius = min(image.shape[:2]) // 20
  taps = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-(taps**2) / (2 * sigma**2))
  kernel /= kernel.sum()
  padded = np.pad(image.astype(np.float64), [(radius, radius), (radius, radius), (0, 0)], "reflect")
  height, width = image.shape[:2]
  rows = sum(k * padded[i : i + height] for i, k in enumerate(kernel))
  return sum(k * rows[:, i : i + width] for i, k in enumerate(kernel))


@pytest.mark.parametrize("shape", [(64, 64, 3), (50, 37, 3), (20, 25, 3)])
@pytest.mark.parametrize("sigma", [0.1, 1.3, 2.0])
def test_gaussian_blur_matches_float64_reference(shape, sigma):
  image = _smooth_image(*shape, seed=5)
  image = np.clip(image + np.random.default_rng(6).normal(0, 0.1, shape), 0, 1).astype(np.float32)
  out = augment_photometric.gaussian_blur(image, sigma).numpy()
  np.testing.assert_allclose(out, _blur_reference(image, sigma), rtol=0, atol=1e-6)


def test_blur_of_constant_image_is_constant():
  image = np.full((64, 64, 3), 0.3, np.float32)
  np.testing.assert_allclose(
    augment_photometric.gaussian_blur(image, 1.7).numpy(), image, atol=1e-6
  )
  out = augment_photometric.random_gaussian_blur(image, _seed(), p=1.0).numpy()
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_rotate_by_zero_is_identity_and_by_90_is_rot90():
  np.testing.assert_array_equal(augment.rotate(_RGB, 0.0).numpy(), _RGB)
  np.testing.assert_array_equal(augment.rotate(_RGB, tf.constant(0.0)).numpy(), _RGB)
  np.testing.assert_array_equal(augment.random_rotate(_RGB, _seed(), max_degrees=0).numpy(), _RGB)
  square = _RGB[:40]
  np.testing.assert_allclose(augment.rotate(square, 90.0).numpy(), np.rot90(square), atol=1e-5)


def test_rotate_fill_modes():
  image = np.ones((32, 32, 3), np.float32)
  constant = augment.rotate(image, 45.0).numpy()
  assert constant[0, 0].max() == 0.0 and constant[16, 16].min() == 1.0
  nearest = augment.rotate(image, 45.0, fill_mode="nearest").numpy()
  np.testing.assert_allclose(nearest, image, atol=1e-6)
  with pytest.raises(ValueError, match="fill_mode"):
    augment.rotate(image, 45.0, fill_mode="reflect")


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("preset", sorted(augment_presets.PRESETS))
@pytest.mark.parametrize("source", ["jpeg", "gray_jpeg", "rgb", "gray"])
def test_presets_run(preset, size, source):
  image = {"jpeg": _JPEG, "gray_jpeg": _GRAY_JPEG, "rgb": _RGB, "gray": _GRAY}[source]
  out = augment_presets.pretrain_view(tf.constant(image), _seed(), preset=preset, size=size)
  assert out.shape == (size, size, 3) and out.dtype == tf.float32
  assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0
  tuned = augment_presets.finetune_train(tf.constant(image), _seed(), size=size, preset=preset)
  assert tuned.shape == (size, size, 3) and tuned.dtype == tf.float32


def test_preset_contents():
  presets = augment_presets.PRESETS
  assert presets["simclr"] == augment_presets.ViewPreset(
    crop_area_range=(0.08, 1.0),
    flip=True,
    jitter_strength=1.0,
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=0.5,
    rotation_degrees=0.0,
  )
  assert presets["cxr"].rotation_degrees == 45.0 and presets["cxr"].jitter_strength == 0.5
  assert presets["cxr"].blur_p == 0.0 and presets["cxr"].flip
  assert presets["derm"].blur_p == 0.5 and 0 < presets["derm"].rotation_degrees <= 30
  finetune = augment_presets.FINETUNE_PRESETS
  assert finetune["cxr"].jitter_strength == 0.0 and finetune["derm"].jitter_strength > 0.0
  assert all(p.blur_p == 0.0 and p.grayscale_p == 0.0 for p in finetune.values())


def test_view_preset_is_frozen_and_validated():
  preset = augment_presets.ViewPreset()
  with pytest.raises(dataclasses.FrozenInstanceError):
    preset.blur_p = 0.0  # type: ignore[misc]
  with pytest.raises(ValueError, match="crop_area_range"):
    augment_presets.ViewPreset(crop_area_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="blur_p"):
    augment_presets.ViewPreset(blur_p=1.5)
  custom = dataclasses.replace(preset, blur_p=0.0, grayscale_p=0.0)
  out = augment_presets.pretrain_view(_RGB, _seed(), preset=custom, size=_SIZE)
  assert out.shape == (_SIZE, _SIZE, 3)


def test_unknown_preset_raises_listing_valid_names():
  with pytest.raises(ValueError, match=r"'cxr', 'cxr_small', 'derm', 'derm_small', 'simclr'"):
    augment_presets.pretrain_view(_RGB, _seed(), preset="imagenet", size=_SIZE)
  with pytest.raises(ValueError, match="valid"):
    augment_presets.finetune_train(_RGB, _seed(), size=_SIZE, preset="chexpert")


def test_center_crop_window():
  window = augment.center_crop_window(tf.constant([64, 48, 3]), 0.875).numpy()
  np.testing.assert_array_equal(window, [11, 3, 42, 42])
  window = augment.center_crop_window(tf.constant([375, 500, 3]), 1.0).numpy()
  np.testing.assert_array_equal(window, [0, 63, 375, 375])


def test_eval_preprocess_is_deterministic_and_centre_crops():
  image = _smooth_image(64, 48, 3, seed=7)
  out = augment_presets.eval_preprocess(image, size=42)  # 42 = 0.875 · 48: no resampling.
  np.testing.assert_allclose(out.numpy(), image[11:53, 3:45], atol=1e-6)
  again = augment_presets.eval_preprocess(image, size=42).numpy()
  np.testing.assert_array_equal(again, out.numpy())
  resized = augment_presets.eval_preprocess(image, size=_SIZE)
  assert resized.shape == (_SIZE, _SIZE, 3)
  graph = _in_tf_data(lambda x: augment_presets.eval_preprocess(x, size=_SIZE), image)
  np.testing.assert_allclose(graph, resized.numpy(), atol=1e-6)


@pytest.mark.parametrize("encoded", [_JPEG, _GRAY_JPEG, _PNG], ids=["jpeg", "gray_jpeg", "png"])
def test_eval_preprocess_from_bytes_matches_decoded(encoded):
  decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  fast = augment_presets.eval_preprocess(tf.constant(encoded), size=_SIZE).numpy()
  slow = augment_presets.eval_preprocess(decoded, size=_SIZE).numpy()
  np.testing.assert_allclose(fast, slow, rtol=0, atol=2 / 255)
  graph = _in_tf_data(lambda x: augment_presets.eval_preprocess(x, size=_SIZE), encoded)
  np.testing.assert_allclose(graph, fast, atol=1e-6)


def _portrait_with_bottom_mark(height=390, width=320) -> np.ndarray:
  """A dark portrait radiograph-shaped image with a bright band in its bottom 2% (the bases)."""
  image = np.full((height, width, 1), 0.1, np.float32)
  image[-height // 50 :] = 1.0
  return image


@pytest.mark.parametrize("encoded", [False, True], ids=["decoded", "jpeg"])
def test_cxr_evaluation_keeps_the_bottom_edge(encoded):
  image = _portrait_with_bottom_mark()
  source = tf.constant(_encode(image, "jpeg")) if encoded else image
  cxr = augment_presets.eval_preprocess(source, size=64, preset="cxr").numpy()
  assert cxr[-1].mean() > 0.8  # the band survives in the last row
  assert cxr[: 64 // 2].max() < 0.2
  # SimCLR's centre crop (photos) drops it: the square is cut from the middle of the height.
  photo = augment_presets.eval_preprocess(source, size=64, preset="derm").numpy()
  assert photo.max() < 0.2
  graph = _in_tf_data(lambda x: augment_presets.eval_preprocess(x, size=64, preset="cxr"), source)
  np.testing.assert_allclose(graph, cxr, atol=1e-6)


def _area_average(image: np.ndarray, factor: int) -> np.ndarray:
  """Independent reference: the mean of each factor×factor block (exact area downsampling)."""
  h, w, c = image.shape
  return image.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def test_large_downsamples_are_antialiased():
  # 1-pixel lines every 4 pixels, downsampled 8×: the area average is 0.25 everywhere. Without
  # antialiasing a bicubic resize reads the 4 pixels around each sample point and returns 0.5625.
  _, x = np.mgrid[:256, :256]
  checker = (x % 4 == 0).astype(np.float32)[..., None]
  out = augment.resize_whole(checker, size=32).numpy()[..., :1]
  np.testing.assert_allclose(out[2:-2, 2:-2], _area_average(checker, 8)[2:-2, 2:-2], atol=0.02)
  # On a smooth image the antialiased resize stays close to the area average too.
  coarse = np.random.default_rng(11).uniform(0, 1, (8, 8, 1)).astype(np.float32)
  smooth = tf.image.resize(coarse, [256, 256], method="bilinear").numpy()
  out = augment.resize_whole(smooth, size=32).numpy()[..., :1]
  np.testing.assert_allclose(out, _area_average(smooth, 8), atol=0.02)
  # Every training view is resized the same way (the random crop's resize is antialiased).
  whole = augment_presets.ViewPreset(
    crop_area_range=(1.0, 1.0),
    crop_aspect_ratio_range=(1.0, 1.0),
    flip=False,
    jitter_strength=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
  )
  view = augment_presets.pretrain_view(checker, _seed(), preset=whole, size=32).numpy()
  np.testing.assert_allclose(view[2:-2, 2:-2, 0], 0.25, atol=0.02)

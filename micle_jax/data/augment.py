"""Stateless TensorFlow image augmentations for SimCLR/MICLe views.

Every random op is stateless and takes an explicit ``seed``: a shape-[2] int32/int64 tensor. Ops
derive their sub-seeds with ``tf.random.experimental.stateless_split``, so one seed per view fixes
the whole view, and a function gives identical results eagerly and inside ``tf.data.Dataset.map``.
Nothing reads TensorFlow's global random state or Python's ``random``.

The ops are plain graph-building code: data-dependent choices use `tf.cond`/`tf.switch_case`, and
Python `if`s only look at Python arguments. Public functions are therefore marked
`tf.autograph.experimental.do_not_convert`, which makes tracing them in `tf.data` ~4x faster.

Images are float32 in [0, 1], HWC (uint8/uint16 inputs are rescaled); grayscale inputs are
replicated to 3 channels. Outputs are float32 in [0, 1] with 3 channels and no mean/std
normalisation, as in SimCLR.

This module holds the seed and dtype helpers and the geometric ops (crops, decoding, flip,
rotation); `augment_photometric` holds colour jitter, grayscale and blur, and `augment_presets`
the view recipes built from both.
"""

import functools
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

# SimCLR crops relative to a single box covering the whole image.
_WHOLE_IMAGE_BOX = (((0.0, 0.0, 1.0, 1.0),),)
# SimCLR's `min_object_covered`: with the whole-image box it is a second lower bound on the area.
_MIN_OBJECT_COVERED = 0.1

WindowFn = Callable[[tf.Tensor], tf.Tensor]


def _as_seed(seed: tf.Tensor) -> tf.Tensor:
  """Casts a seed to int64, so that int32 and int64 seeds of equal value give equal results."""
  return tf.cast(seed, tf.int64)


@tf.autograph.experimental.do_not_convert
def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits a shape-[2] stateless seed into `num` independent shape-[2] int64 seeds."""
  return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num))


def _coin(seed: tf.Tensor, p: float) -> tf.Tensor:
  """A scalar bool tensor that is True with probability `p`."""
  return tf.random.stateless_uniform([], _as_seed(seed)) < p


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
  """A scalar float32 drawn from U[low, high)."""
  return tf.random.stateless_uniform([], _as_seed(seed), minval=low, maxval=high)


@tf.autograph.experimental.do_not_convert
def random_apply(
  image: tf.Tensor, seed: tf.Tensor, p: float, fn: Callable[[tf.Tensor], tf.Tensor]
) -> tf.Tensor:
  """Returns `fn(image)` with probability `p`, else `image` (no random op for p ∈ {0, 1})."""
  if p <= 0.0:
    return image
  if p >= 1.0:
    return fn(image)
  return tf.cond(_coin(seed, p), lambda: fn(image), lambda: image)


def _ensure_rgb(image: tf.Tensor) -> tf.Tensor:
  """Replicates 1-channel (or gray+alpha) images to 3 channels; drops alpha from RGBA."""
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels is not None:
    return tf.tile(image[..., :1], [1, 1, 3]) if channels < 3 else image[..., :3]
  rgb = tf.cond(
    tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3]
  )
  rgb.set_shape(image.shape[:-1].concatenate([3]))
  return rgb


def _to_float(image: tf.Tensor) -> tf.Tensor:
  """Converts to float32 in [0, 1]; integer images are rescaled by their dtype's maximum."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.float32:
    return image
  return tf.image.convert_image_dtype(image, tf.float32)


@tf.autograph.experimental.do_not_convert
def to_rgb_float(image: tf.Tensor) -> tf.Tensor:
  """Returns `image` as float32 in [0, 1] with 3 channels (grayscale replicated)."""
  return _ensure_rgb(_to_float(image))


def _crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Crops HWC `image` to `window` = [offset_y, offset_x, height, width]."""
  return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], -1])


def _resize_to_rgb(image: tf.Tensor, size: int) -> tf.Tensor:
  """Antialiased bicubic resize to size×size, clip to [0, 1], replicate grayscale to 3 channels.

  Antialiasing widens the cubic kernel by the downsampling factor, so a large downsample (an NIH
  1024² radiograph to 224², say) averages the pixels it covers instead of sampling a few of them:
  without it, fine texture aliases into patterns that differ between datasets only because
  their resolutions do. It changes nothing when upsampling, where the plain (3× cheaper) bicubic
  runs instead.
  """
  image = _to_float(image)
  shape = tf.shape(image)

  def resize(antialias: bool) -> tf.Tensor:
    method = tf.image.ResizeMethod.BICUBIC
    return tf.image.resize(image, [size, size], method=method, antialias=antialias)

  shrinks = tf.logical_or(shape[0] > size, shape[1] > size)
  image = tf.cond(shrinks, lambda: resize(True), lambda: resize(False))
  return _ensure_rgb(tf.clip_by_value(image, 0.0, 1.0))


@tf.autograph.experimental.do_not_convert
def random_crop_window(
  image_shape: tf.Tensor,
  seed: tf.Tensor,
  *,
  area_range: Sequence[float] = (0.08, 1.0),
  aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
  max_attempts: int = 100,
) -> tf.Tensor:
  """Samples SimCLR's random-resized-crop window for an image of `image_shape`.

  Uses `tf.image.stateless_sample_distorted_bounding_box` with a whole-image box,
  `min_object_covered=0.1` (so the area is also at least 10%, as in SimCLR) and
  `use_image_if_no_bounding_boxes=True`; after `max_attempts` failures the window is the whole
  image.

  Args:
    image_shape: int32 [height, width, channels], e.g. `tf.shape(image)` or
      `tf.image.extract_jpeg_shape(encoded)`.
    seed: shape-[2] int32/int64 stateless seed.
    area_range: allowed crop area as a fraction of the image area.
    aspect_ratio_range: allowed crop width / height.
    max_attempts: sampling attempts before falling back to the whole image.

  Returns:
    int32 [offset_y, offset_x, height, width], the `crop_window` of `tf.image.decode_and_crop_jpeg`.
  """
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.cast(image_shape, tf.int32),
    bounding_boxes=tf.constant(_WHOLE_IMAGE_BOX, tf.float32),
    seed=_as_seed(seed),
    min_object_covered=_MIN_OBJECT_COVERED,
    aspect_ratio_range=tuple(aspect_ratio_range),
    area_range=tuple(area_range),
    max_attempts=max_attempts,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


@tf.autograph.experimental.do_not_convert
def center_crop_window(image_shape: tf.Tensor, crop_fraction: float = 0.875) -> tf.Tensor:
  """The centred square window whose side is `crop_fraction` of the shorter image side.

  Args:
    image_shape: int32 [height, width, ...].
    crop_fraction: side of the square as a fraction of min(height, width), in (0, 1].

  Returns:
    int32 [offset_y, offset_x, side, side].
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  height, width = image_shape[0], image_shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.maximum(tf.cast(tf.math.rint(crop_fraction * shorter), tf.int32), 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


@tf.autograph.experimental.do_not_convert
def random_resized_crop(
  image: tf.Tensor,
  seed: tf.Tensor,
  *,
  size: int,
  area_range: Sequence[float] = (0.08, 1.0),
  aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
  max_attempts: int = 100,
) -> tf.Tensor:
  """SimCLR's random resized crop: a `random_crop_window` crop, bicubic-resized to size×size.

  Args:
    image: HWC image, float32 in [0, 1] (or uint8/uint16), 1 or 3 channels.
    seed: shape-[2] stateless seed.
    size: output side in pixels.
    area_range: see `random_crop_window`.
    aspect_ratio_range: see `random_crop_window`.
    max_attempts: see `random_crop_window`.

  Returns:
    float32 [size, size, 3] in [0, 1].
  """
  image = tf.convert_to_tensor(image)
  window = random_crop_window(
    tf.shape(image),
    seed,
    area_range=area_range,
    aspect_ratio_range=aspect_ratio_range,
    max_attempts=max_attempts,
  )
  return _resize_to_rgb(_crop(image, window), size)


@tf.autograph.experimental.do_not_convert
def whole_image_window(image_shape: tf.Tensor) -> tf.Tensor:
  """The window covering the whole image: int32 [0, 0, height, width]."""
  return tf.stack([0, 0, tf.cast(image_shape[0], tf.int32), tf.cast(image_shape[1], tf.int32)])


@tf.autograph.experimental.do_not_convert
def resize_whole(image: tf.Tensor, *, size: int) -> tf.Tensor:
  """The whole image, every edge kept, resized to size×size (the aspect ratio is not kept, as in
  training's random resized crop)."""
  return _resize_to_rgb(tf.convert_to_tensor(image), size)


@tf.autograph.experimental.do_not_convert
def decode_and_resize_whole(encoded: tf.Tensor, *, size: int, channels: int = 3) -> tf.Tensor:
  """`resize_whole` straight from encoded bytes."""
  return _decode_and_crop(encoded, whole_image_window, size, channels)


@tf.autograph.experimental.do_not_convert
def center_crop(image: tf.Tensor, *, size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """Deterministic centre crop (`center_crop_window`), bicubic-resized to size×size, clipped."""
  image = tf.convert_to_tensor(image)
  return _resize_to_rgb(_crop(image, center_crop_window(tf.shape(image), crop_fraction)), size)


def _decode_and_crop(
  encoded: tf.Tensor, window_fn: WindowFn, size: int, channels: int
) -> tf.Tensor:
  """Decodes only `window_fn(shape)` of a JPEG (or all of another format, then crops), resizes."""
  encoded = tf.convert_to_tensor(encoded, tf.string)

  def jpeg() -> tf.Tensor:
    window = window_fn(tf.image.extract_jpeg_shape(encoded))
    return _resize_to_rgb(tf.image.decode_and_crop_jpeg(encoded, window, channels=channels), size)

  def other() -> tf.Tensor:
    # uint16 keeps the full depth of 16-bit PNGs; 8-bit sources are scaled exactly.
    image = tf.io.decode_image(encoded, channels=channels, dtype=tf.uint16, expand_animations=False)
    return _resize_to_rgb(_crop(image, window_fn(tf.shape(image))), size)

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


@tf.autograph.experimental.do_not_convert
def decode_and_random_resized_crop(
  encoded: tf.Tensor,
  seed: tf.Tensor,
  *,
  size: int,
  channels: int = 3,
  area_range: Sequence[float] = (0.08, 1.0),
  aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
  max_attempts: int = 100,
) -> tf.Tensor:
  """`random_resized_crop` straight from encoded bytes, decoding only the crop of a JPEG.

  A JPEG's window is sampled from `tf.image.extract_jpeg_shape` and decoded with
  `tf.image.decode_and_crop_jpeg`; other formats (PNG, ...) are decoded whole, then cropped. For
  the same seed the window is the one `random_resized_crop` picks on the decoded image, and the
  result is identical, except that with 4:2:0 chroma subsampling a crop edge inside a chroma block
  can change the crop's outermost pixels by a few levels.

  Args:
    encoded: scalar string tensor, JPEG/PNG/BMP/GIF bytes.
    seed: shape-[2] stateless seed.
    size: output side in pixels.
    channels: channels to decode: 3, 1, or 0 for the file's own; gray is replicated to 3.
    area_range: see `random_crop_window`.
    aspect_ratio_range: see `random_crop_window`.
    max_attempts: see `random_crop_window`.

  Returns:
    float32 [size, size, 3] in [0, 1].
  """
  window_fn = functools.partial(
    random_crop_window,
    seed=seed,
    area_range=area_range,
    aspect_ratio_range=aspect_ratio_range,
    max_attempts=max_attempts,
  )
  return _decode_and_crop(encoded, window_fn, size, channels)


@tf.autograph.experimental.do_not_convert
def decode_and_center_crop(
  encoded: tf.Tensor, *, size: int, crop_fraction: float = 0.875, channels: int = 3
) -> tf.Tensor:
  """`center_crop` straight from encoded bytes (JPEGs decode only the window)."""
  return _decode_and_crop(
    encoded, lambda shape: center_crop_window(shape, crop_fraction), size, channels
  )


@tf.autograph.experimental.do_not_convert
def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Flips left-right with probability 0.5."""
  image = to_rgb_float(image)
  return tf.cond(_coin(seed, 0.5), lambda: tf.reverse(image, axis=[1]), lambda: image)


@tf.autograph.experimental.do_not_convert
def rotate(
  image: tf.Tensor, degrees: float | tf.Tensor, *, fill_mode: str = "constant"
) -> tf.Tensor:
  """Rotates counter-clockwise about the image centre, bilinear, keeping the size.

  Args:
    image: HWC image in [0, 1].
    degrees: rotation angle in degrees (counter-clockwise).
    fill_mode: "constant" fills uncovered corners with 0 (black, like an X-ray's background);
      "nearest" repeats the edge pixels.

  Returns:
    float32 HW3 in [0, 1]; rotating by 0 returns the image exactly.
  """
  if fill_mode not in ("constant", "nearest"):
    raise ValueError(f"fill_mode must be 'constant' or 'nearest', got {fill_mode!r}")
  image = to_rgb_float(image)
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  height, width = shape[0] - 1.0, shape[1] - 1.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Maps each output pixel to its input location (tfa.image.rotate's transform).
  x_offset = (width - (cos * width - sin * height)) / 2.0
  y_offset = (height - (sin * width + cos * height)) / 2.0
  transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])[None]
  rotated = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform,
    output_shape=tf.shape(image)[:2],
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode=fill_mode.upper(),
  )[0]
  rotated.set_shape(image.shape)
  return tf.clip_by_value(rotated, 0.0, 1.0)


@tf.autograph.experimental.do_not_convert
def random_rotate(
  image: tf.Tensor, seed: tf.Tensor, *, max_degrees: float, fill_mode: str = "constant"
) -> tf.Tensor:
  """`rotate` by an angle ~ U[-max_degrees, max_degrees]; see `rotate` for `fill_mode`."""
  if max_degrees < 0:
    raise ValueError(f"max_degrees must be >= 0, got {max_degrees}")
  image = to_rgb_float(image)
  if max_degrees == 0:
    return image
  return rotate(image, _uniform(seed, -max_degrees, max_degrees), fill_mode=fill_mode)

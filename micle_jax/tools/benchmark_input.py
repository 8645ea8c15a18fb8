"""Input-pipeline benchmark: augmented views per second on one CPU core, decode included.

Synthetic, in-memory JPEGs (textured, ~80 KB at 500×375, quality 90) go through the real view
code, `augment_presets.pretrain_view` on encoded bytes (JPEGs decode only the crop), in a tf.data
map restricted to one thread. SimCLR makes two views of one image; the MICLe path builds cases of
2–4 encoded images, samples two distinct ones with `input_pipeline.sample_pair_indices` and makes
one view of each, as `input_pipeline.make_pair_fn` does. Wall-clock rates are per core only on an
otherwise idle core; CPU seconds per pair (`time.process_time`) stay honest under load.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf
from absl import logging

from micle_jax.data import augment_presets, input_pipeline

JPEG_HEIGHT = 375
JPEG_WIDTH = 500
JPEG_QUALITY = 90
MICLE_CASE_SIZES = (2, 4)  # inclusive range of images per synthetic case
_WARMUP_PAIRS = 4
_BATCH_SIZE = 16
_MICLE = "micle"  # key of the MICLe measurement among the SimCLR presets' (none is named so)


def restrict_tf_to_one_thread() -> bool:
  """Pins TensorFlow's intra- and inter-op pools to one thread each, and hides accelerators.

  Returns:
    True if applied; False when TensorFlow's runtime was already initialised (then only the
    tf.data options of each measured dataset restrict it).
  """
  try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError as e:
    logging.warning("TensorFlow threads not restricted (runtime already initialised): %s", e)
    return False
  return True


def synthetic_image(seed: int, height: int = JPEG_HEIGHT, width: int = JPEG_WIDTH) -> tf.Tensor:
  """A textured uint8 [height, width, 3] image: smooth colour fields plus mid and fine noise."""
  coarse_seed, mid_seed, fine_seed = tf.unstack(
    tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), 3)
  )
  coarse = tf.random.stateless_uniform([1, height // 16, width // 16, 3], coarse_seed)
  coarse = tf.image.resize(coarse, [height, width], method="bicubic")[0]
  mid = tf.random.stateless_uniform([1, height // 4, width // 4, 1], mid_seed)
  mid = tf.image.resize(mid, [height, width], method="bilinear")[0]
  fine = tf.random.stateless_uniform([height, width, 1], fine_seed)
  image = tf.clip_by_value(0.6 * coarse + 0.3 * mid + 0.1 * fine, 0.0, 1.0)
  return tf.image.convert_image_dtype(image, tf.uint8, saturate=True)


def synthetic_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  """`num_images` encoded JPEGs (quality 90), deterministic in `seed`."""
  return [
    tf.io.encode_jpeg(synthetic_image(seed * 1_000_003 + i), quality=JPEG_QUALITY).numpy()
    for i in range(num_images)
  ]


def synthetic_cases(jpegs: list[bytes], num_cases: int, seed: int = 0) -> dict[str, tf.Tensor]:
  """Cases of 2–4 images each, taken cyclically from `jpegs`.

  Returns:
    {"images": string [num_cases, 4] (padded with b""), "num_images": int64 [num_cases],
    "case_id": string [num_cases]}, the layout of a case-level TFDS example.
  """
  low, high = MICLE_CASE_SIZES
  counts = tf.random.stateless_uniform(
    [num_cases], tf.constant([seed, 1], tf.int64), low, high + 1, dtype=tf.int64
  ).numpy()
  images, start = [], 0
  for count in counts:
    case = [jpegs[(start + k) % len(jpegs)] for k in range(count)]
    images.append(case + [b""] * (high - count))
    start += int(count)
  return {
    "images": tf.constant(images),
    "num_images": tf.constant(counts),
    "case_id": tf.constant([f"case{i}" for i in range(num_cases)]),
  }


def _one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return ds.with_options(options)


def simclr_dataset(jpegs: list[bytes], preset: str, size: int, seed: int = 0) -> tf.data.Dataset:
  """Batches of (view1, view2): two views of each encoded image, one map thread."""
  view = _view_fn(preset, size)

  def pair(index, encoded):
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(_seed(seed, index), 2))
    return view(encoded, s1), view(encoded, s2)

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).enumerate()
  return _one_thread(ds.map(pair, num_parallel_calls=1).batch(_BATCH_SIZE))


def micle_dataset(
  cases: dict[str, tf.Tensor], preset: str, size: int, seed: int = 0
) -> tf.data.Dataset:
  """Batches of (view1, view2): one view each of two distinct images of every case."""
  view = _view_fn(preset, size)

  def pair(index, case):
    s_pick, s1, s2 = tf.unstack(tf.random.experimental.stateless_split(_seed(seed, index), 3))
    i, j = input_pipeline.sample_pair_indices(case["num_images"], s_pick, distinct=True)
    return view(tf.gather(case["images"], i), s1), view(tf.gather(case["images"], j), s2)

  ds = tf.data.Dataset.from_tensor_slices(cases).enumerate()
  return _one_thread(ds.map(pair, num_parallel_calls=1).batch(_BATCH_SIZE))


def _view_fn(preset: str, size: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  augment_presets.get_preset(preset)  # Fails early, listing the valid names.
  return lambda encoded, seed: augment_presets.pretrain_view(
    encoded, seed, preset=preset, size=size
  )


def _seed(seed: int, index: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def _timed_pass(ds: tf.data.Dataset, num_pairs: int) -> tuple[float, float]:
  """(wall seconds, CPU seconds) of one full pass over `ds`, which must yield `num_pairs`."""
  wall_start, cpu_start = time.perf_counter(), time.process_time()
  pairs = 0
  for view1, _ in ds:
    pairs += int(view1.shape[0])
  wall = time.perf_counter() - wall_start
  cpu = time.process_time() - cpu_start
  if pairs != num_pairs:
    raise RuntimeError(f"dataset yielded {pairs} pairs, expected {num_pairs}")
  return wall, cpu


def measure_pairs(
  datasets: dict[str, tf.data.Dataset], num_pairs: int, repeats: int = 3
) -> dict[str, dict[str, Any]]:
  """Times `repeats` full passes over every dataset, interleaved, after a short warm-up of each.

  Passes go round-robin (a, b, c, a, b, c, ...), so that a change in the machine's load hits
  every dataset alike; each figure is the median over the passes.

  Returns:
    {name: stats}: pairs/s and views/s (wall clock), CPU seconds per pair and per view, pairs
    per CPU second, and the median pass's `wall_s`/`cpu_s`; see docs/benchmark.md.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  for ds in datasets.values():
    for _ in ds.unbatch().take(_WARMUP_PAIRS):
      pass
  passes: dict[str, list[tuple[float, float]]] = {name: [] for name in datasets}
  for _ in range(repeats):
    for name, ds in datasets.items():
      passes[name].append(_timed_pass(ds, num_pairs))
  result = {}
  for name, timings in passes.items():
    wall = statistics.median(w for w, _ in timings)
    cpu = statistics.median(c for _, c in timings)
    result[name] = {
      "pairs_per_s": num_pairs / wall,
      "views_per_s": 2 * num_pairs / wall,
      "cpu_s_per_pair": cpu / num_pairs,
      "cpu_s_per_view": cpu / (2 * num_pairs),
      "pairs_per_cpu_s": num_pairs / cpu if cpu > 0 else None,
      "num_pairs": num_pairs,
      "repeats": repeats,
      "wall_s": wall,
      "cpu_s": cpu,
    }
  return result


def benchmark_input(
  *, num_images: int, image_size: int, micle_preset: str, seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
  """Measures every pretraining preset on SimCLR pairs, and the MICLe pair path.

  Args:
    num_images: synthetic JPEGs (and MICLe cases) per measured pass.
    image_size: output side of each view in pixels.
    micle_preset: the preset of the MICLe measurement (the config's `augment.preset`).
    seed: fixes the images, the cases and every view.
    repeats: timed passes per measurement (interleaved; medians reported).

  Returns:
    The `input` section of the benchmark's JSON (see docs/benchmark.md).
  """
  if num_images < 1:
    raise ValueError(f"input_images={num_images} must be >= 1")
  threads_restricted = restrict_tf_to_one_thread()
  start = time.perf_counter()
  jpegs = synthetic_jpegs(num_images, seed)
  logging.info("Synthesised %d JPEGs in %.1f s", num_images, time.perf_counter() - start)
  result: dict[str, Any] = {
    "image_size": image_size,
    "num_images": num_images,
    "jpeg_height": JPEG_HEIGHT,
    "jpeg_width": JPEG_WIDTH,
    "jpeg_quality": JPEG_QUALITY,
    "jpeg_bytes_mean": sum(len(j) for j in jpegs) / num_images,
    "tf_threads_restricted": threads_restricted,
    "tf_version": tf.__version__,
    "repeats": repeats,
  }
  datasets = {
    preset: simclr_dataset(jpegs, preset, image_size, seed) for preset in augment_presets.PRESETS
  }
  cases = synthetic_cases(jpegs, num_images, seed)
  datasets[_MICLE] = micle_dataset(cases, micle_preset, image_size, seed)
  stats = measure_pairs(datasets, num_images, repeats)
  micle = stats.pop(_MICLE)
  for preset, preset_stats in stats.items():
    logging.info("SimCLR pairs, preset %s: %s", preset, preset_stats)
  logging.info("MICLe pairs, preset %s: %s", micle_preset, micle)
  result["presets"] = stats
  result["micle"] = {"preset": micle_preset, **micle}
  simclr = result["presets"][micle_preset]
  result["micle_vs_simclr"] = micle["pairs_per_s"] / simclr["pairs_per_s"]
  result["micle_vs_simclr_cpu"] = simclr["cpu_s_per_pair"] / micle["cpu_s_per_pair"]
  return result

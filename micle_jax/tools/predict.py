r"""Batch prediction with a fine-tuned model: `python -m micle_jax.predict --workdir=FT_DIR
--images=FOLDER_OR_CSV --out=preds.csv [--case_column=case_id] [--image_column=image_path]`.

The model is rebuilt from the fine-tuning workdir alone: `config.json` (architecture, mode, task,
image size), `results.json` ("labels": the classifier's output names) and the latest checkpoint
under `checkpoints/`. Images are preprocessed exactly as in evaluation
(`augment_presets.eval_preprocess` with the run's augmentation preset: the whole image for chest
X-rays, a centred crop of 87.5% of the shorter side for photos; antialiased bicubic resize)
and run through `steps.predict_step` under jit on the default devices, the last batch padded.

Inputs (`--images`):
- a folder: every .jpg/.jpeg/.png below it (recursively, any case of suffix), sorted by relative
  path;
- a CSV file with an image column (paths relative to the CSV's folder; absolute paths and paths
  leaving that folder are rejected) and, with `--case_column`, a case column.

Outputs:
- `--out` (per image): `image` (the relative path), `case_id` (when `--case_column` is given),
  one `prob_<label>` column per label in the model's order, and for multi-class tasks
  `predicted` (the argmax label name). Probabilities are softmax (multi-class) or a sigmoid per
  label (chexpert/nih); multi-label outputs get no `predicted` column, since a threshold is a
  clinical choice.
- with `--case_column`, also `<out stem>_cases.csv` (e.g. `preds_cases.csv`): `case_id`,
  `num_images`, the per-case mean of each `prob_<label>` (as case-level evaluation averages
  them) and, for multi-class, `predicted`. Cases appear in order of first appearance.

A listed file that does not exist is always an error; an image that cannot be decoded is an
error naming it, unless `--skip_unreadable`, which drops it and logs how many were skipped.
"""

import collections
import csv
import dataclasses
import json
import posixpath
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags, logging
from etils import epath

from micle_jax import app, finetune, specs
from micle_jax.data import augment_presets, tasks
from micle_jax.eval import eval_metrics
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, restore_rules, run_files, sharding
from micle_jax.train import steps, train_state

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CONFIG_FILE = "config.json"
PROB_PREFIX = "prob_"
CASES_SUFFIX = "_cases"


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A restored fine-tuned model, ready for `predict_images`."""

  labels: tuple[str, ...]
  task: str  # the step task: "multiclass" (softmax) or "multilabel" (sigmoid per label)
  image_size: int
  preset: str  # the augmentation preset, which picks the evaluation view
  state: train_state.TrainState
  mesh: jax.sharding.Mesh
  predict_fn: Callable[[train_state.TrainState, jax.Array], jax.Array]  # jitted predict_step


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Per-image probabilities [N, len(labels)] in the order of `images`."""

  labels: tuple[str, ...]
  task: str
  images: list[str]
  case_ids: list[str] | None
  probs: np.ndarray
  skipped: list[str]


def _read_json(path: epath.Path) -> dict[str, Any]:
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not a fine-tuning workdir?")
  return json.loads(path.read_text())


def load_predictor(workdir: epath.PathLike) -> Predictor:
  """Rebuilds the model of a fine-tuning workdir and restores its latest weights.

  Raises:
    FileNotFoundError: naming `config.json`, `results.json` or `checkpoints/` when missing.
    ValueError: when results.json has no labels or the checkpoint does not fit the config.
  """
  workdir = epath.Path(workdir)
  config = ml_collections.ConfigDict(run_files.upgrade(_read_json(workdir / CONFIG_FILE)))
  results_path = workdir / finetune.RESULTS_FILE
  labels = tuple(_read_json(results_path).get("labels") or ())
  if not labels:
    raise ValueError(f"{results_path} has no 'labels' list")
  try:
    spec = finetune.validate(config)
  except specs.ConfigError as e:
    raise ValueError(f"{workdir / CONFIG_FILE}: {e}") from e
  ckpt_dir = workdir / checkpoint.CHECKPOINT_DIR
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir} not found: the workdir has no checkpoint")
  try:
    params, batch_stats, step = checkpoint.load_weights(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{ckpt_dir}: no Orbax checkpoint step found ({e})") from e

  # The same construction as training, so linear mode freezes the backbone identically.
  model = resnet.create_model(finetune.model_spec(spec, len(labels)))
  size = spec.augment.image_size
  abstract = jax.eval_shape(
    lambda: train_state.init_variables(model, jax.random.PRNGKey(0), (size, size, 3))
  )
  variables = {}
  for key, loaded in (("params", params), ("batch_stats", batch_stats)):
    variables[key], _ = restore_rules.restore_allowed(
      abstract.get(key, {}), loaded, restore_rules.WHOLE_MODEL, source=f"{ckpt_dir} ({key})"
    )
  mesh = sharding.create_mesh()
  # The step's output: softmax for multi-class, a sigmoid per label for chexpert/nih.
  label_loss = tasks.get(spec.labels.task).loss
  state = train_state.TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=(),
    apply_fn=model.apply,
    tx=None,
  )
  return Predictor(
    labels=labels,
    task=label_loss,
    image_size=size,
    preset=spec.augment.preset,
    state=sharding.replicate(state, mesh),
    mesh=mesh,
    predict_fn=steps.compile_predict_step(mesh, label_loss=label_loss),
  )


def _relative_path(root: epath.Path, path: str, source: epath.Path) -> str:
  """`path` normalised, or a ValueError when it is absolute or leaves `root`."""
  norm = posixpath.normpath(path.replace("\\", "/"))
  if not path or posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
    raise ValueError(f"{source}: image path {path!r} is not inside {root}")
  return norm


def list_images(
  images: epath.PathLike, *, image_column: str = "image_path", case_column: str | None = None
) -> tuple[epath.Path, list[str], list[str] | None]:
  """The images to predict: (root folder, relative paths, case ids or None).

  Args:
    images: a folder (every .jpg/.jpeg/.png below it, sorted) or a CSV file with `image_column`
      (paths relative to the CSV's folder) and optionally `case_column`.
    image_column: the CSV column holding image paths.
    case_column: the CSV column holding case ids (not available for a folder).

  Raises:
    FileNotFoundError: when `images` or a listed file does not exist.
    ValueError: for an empty input, a missing column, or a path outside the root.
  """
  source = epath.Path(images)
  if source.is_dir():
    if case_column:
      raise ValueError(f"--case_column needs a CSV; {source} is a folder")
    paths = sorted(
      (folder / name).relative_to(source).as_posix()
      for folder, _, files in source.walk()
      for name in files
      if posixpath.splitext(name)[1].lower() in IMAGE_SUFFIXES
    )
    if not paths:
      raise ValueError(f"{source}: no {'/'.join(IMAGE_SUFFIXES)} files found")
    return source, paths, None
  if not source.exists():
    raise FileNotFoundError(f"--images={source}: no such file or directory")
  with source.open() as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    header = reader.fieldnames or []
  for column in filter(None, (image_column, case_column)):
    if column not in header:
      raise ValueError(f"{source}: no column {column!r}; columns are {header}")
  if not rows:
    raise ValueError(f"{source}: no rows")
  root = source.parent
  paths = [_relative_path(root, row[image_column], source) for row in rows]
  missing = [p for p in paths if not (root / p).is_file()]
  if missing:
    raise FileNotFoundError(
      f"{source}: {len(missing)} listed images do not exist under {root}, e.g. {missing[:3]}"
    )
  cases = [row[case_column] for row in rows] if case_column else None
  return root, paths, cases


def _read_view(preprocess, path: epath.Path, skip_unreadable: bool) -> np.ndarray | None:
  """The evaluation view of the image at `path`; None (logged) when it cannot be read and
  `skip_unreadable`, else a ValueError naming the file."""
  try:
    return preprocess(tf.constant(path.read_bytes())).numpy()
  except (tf.errors.OpError, OSError) as e:
    what = "cannot decode the image" if isinstance(e, tf.errors.OpError) else "cannot read it"
    text = e.message if isinstance(e, tf.errors.OpError) else str(e)
    message = " ".join(text.split("}}")[-1].split())
    if not skip_unreadable:
      raise ValueError(f"{path}: {what} ({message})") from e
    logging.warning("Skipped %s: %s (%s)", path, what, message)
    return None


def predict_images(
  predictor: Predictor,
  root: epath.PathLike,
  paths: list[str],
  case_ids: list[str] | None = None,
  *,
  batch_size: int = 64,
  skip_unreadable: bool = False,
) -> Predictions:
  """Probabilities of every image `root/path`, preprocessed as in evaluation.

  `batch_size` is rounded up to a multiple of the data-parallel devices; the last batch is
  padded and the padding dropped.

  Raises:
    ValueError: naming the file when an image cannot be decoded (unless `skip_unreadable`).
  """
  if jax.process_count() > 1:
    raise ValueError("prediction runs in a single process")
  devices = sharding.data_parallel_size(predictor.mesh)
  batch_size = -(-max(batch_size, 1) // devices) * devices
  preprocess = tf.function(
    lambda encoded: augment_presets.eval_preprocess(
      encoded, size=predictor.image_size, preset=predictor.preset
    ),
    input_signature=[tf.TensorSpec([], tf.string)],
  )
  root = epath.Path(root)
  kept, skipped, batch, parts = [], [], [], []

  def flush():
    images = np.stack(batch + [batch[-1]] * (batch_size - len(batch)))
    probs = predictor.predict_fn(
      predictor.state, sharding.make_global_batch(images, predictor.mesh)
    )
    parts.append(np.asarray(jax.device_get(probs))[: len(batch)])
    batch.clear()

  for index, path in enumerate(paths):
    image = _read_view(preprocess, root / path, skip_unreadable)
    if image is None:
      skipped.append(path)
      continue
    batch.append(image)
    kept.append(index)
    if len(batch) == batch_size:
      flush()
  if batch:
    flush()
  if skipped:
    logging.warning(
      "Skipped %d of %d files: they could not be read or decoded", len(skipped), len(paths)
    )
  if not kept:
    raise ValueError(f"{root}: none of the {len(paths)} images could be decoded")
  return Predictions(
    labels=predictor.labels,
    task=predictor.task,
    images=[paths[i] for i in kept],
    case_ids=None if case_ids is None else [case_ids[i] for i in kept],
    probs=np.concatenate(parts),
    skipped=skipped,
  )


def aggregate_cases(preds: Predictions) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(case ids in first-appearance order, mean probabilities [M, C], images per case [M])."""
  if preds.case_ids is None:
    raise ValueError("the predictions carry no case ids")
  ids, probs, _ = eval_metrics.aggregate_by_case(
    preds.case_ids, preds.probs, np.zeros(len(preds.case_ids))
  )
  images_per_case = collections.Counter(preds.case_ids)
  return ids, probs, np.asarray([images_per_case[c] for c in ids], np.int64)


def _write_csv(
  path: epath.Path, keys: dict[str, list[Any]], probs: np.ndarray, preds: Predictions
) -> None:
  header = [*keys, *(PROB_PREFIX + name for name in preds.labels)]
  multiclass = preds.task == "multiclass"
  if multiclass:
    header.append("predicted")
  with path.open("w") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    for row, p in enumerate(probs):
      values = [column[row] for column in keys.values()] + [format(float(x), ".8g") for x in p]
      if multiclass:
        values.append(preds.labels[int(np.argmax(p))])
      writer.writerow(values)


def cases_path(out: epath.PathLike) -> epath.Path:
  """Where the per-case CSV of `out` goes: `preds.csv` -> `preds_cases.csv`."""
  out = epath.Path(out)
  return out.with_name(out.stem + CASES_SUFFIX + (out.suffix or ".csv"))


def write_predictions(preds: Predictions, out: epath.PathLike) -> list[epath.Path]:
  """Writes the per-image CSV (and the per-case CSV when there are case ids); returns the paths."""
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  keys: dict[str, list[Any]] = {"image": preds.images}
  if preds.case_ids is not None:
    keys["case_id"] = preds.case_ids
  _write_csv(out, keys, preds.probs, preds)
  if preds.case_ids is None:
    return [out]
  ids, probs, counts = aggregate_cases(preds)
  _write_csv(cases_path(out), {"case_id": ids, "num_images": list(counts)}, probs, preds)
  return [out, cases_path(out)]


def run(
  workdir: epath.PathLike,
  images: epath.PathLike,
  out: epath.PathLike,
  *,
  image_column: str = "image_path",
  case_column: str | None = None,
  batch_size: int = 64,
  skip_unreadable: bool = False,
) -> Predictions:
  """Loads the model of `workdir`, predicts `images` (folder or CSV) and writes `out` (+ cases)."""
  predictor = load_predictor(workdir)
  root, paths, case_ids = list_images(images, image_column=image_column, case_column=case_column)
  logging.info("Predicting %d images under %s with labels %s", len(paths), root, predictor.labels)
  preds = predict_images(
    predictor, root, paths, case_ids, batch_size=batch_size, skip_unreadable=skip_unreadable
  )
  written = write_predictions(preds, out)
  logging.info("Wrote %s", ", ".join(map(str, written)))
  return preds


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Fine-tuning workdir (config.json, results.json, ckpts).")
  flags.DEFINE_string("images", None, "A folder of .jpg/.jpeg/.png images, or a CSV file.")
  flags.DEFINE_string("out", None, "Per-image CSV; per-case rows go to <stem>_cases.csv.")
  flags.DEFINE_string("image_column", "image_path", "CSV column of image paths.")
  flags.DEFINE_string("case_column", None, "CSV column of case ids: also aggregate per case.")
  flags.DEFINE_integer("batch_size", 64, "Images per step (rounded up to the device count).")
  flags.DEFINE_bool("skip_unreadable", False, "Skip undecodable images instead of failing.")
  flags.mark_flags_as_required(["workdir", "images", "out"])


def main() -> None:
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only decodes; keep it off accelerators.
  run(
    FLAGS.workdir,
    FLAGS.images,
    FLAGS.out,
    image_column=FLAGS.image_column,
    case_column=FLAGS.case_column or None,
    batch_size=FLAGS.batch_size,
    skip_unreadable=FLAGS.skip_unreadable,
  )


if __name__ == "__main__":
  app.run(main, define_flags)

r"""What a pretrained representation encodes: `python -m micle_jax.probe_attributes
--workdir=PRETRAIN_DIR [--workdir=...] --attributes=truth.csv [--columns=a,b] [--out=probe.json]`.

For each pretraining workdir (its `config.json` and latest checkpoint), embeds the probe set of
its config (`probe`: dataset, split, views, the first `max_images` images) with the backbone in
inference mode and scores, on the same frozen features and the same leave-patient-out kNN as the
pretraining probe (`eval.probe`):

- the probe's label metrics (mean AUC and the AUC of each label, or top-1), and
- for each numeric column of `--attributes` (a CSV with one row per image; `--path_column`
  holds the image's id as its dataset stores it, e.g. CheXpert's `Path`), the R² of predicting
  that attribute from the neighbours (`probe.attribute_r2`): how much of it the representation
  keeps. Blank cells are left out of that column.

Written for questions like "does this pretraining keep the heart's size, and does it ignore the
exposure?": the synthetic CheXpert writer records what it drew in `truth.csv`
(`data_builders/synthetic/chexpert_layout.py`), and any per-image measurement of your own works
the same way. An image of the probe set missing from the CSV is an error naming it.
"""

import csv
import dataclasses
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags, logging
from etils import epath

from micle_jax import app, specs
from micle_jax.eval import probe
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint, run_files, sharding


@dataclasses.dataclass(frozen=True)
class Weights:
  """A pretraining's restored backbone, shaped like the training state the probe scores."""

  apply_fn: Any
  params: Any
  batch_stats: Any
  step: int


def read_attributes(
  path: epath.PathLike, path_column: str, columns: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
  """{column: {image id: value}} of the numeric `columns` (all but `path_column` if empty).

  Raises:
    ValueError: naming the file (and row) for a missing column or a cell that is not a number.
  """
  path = epath.Path(path)
  with path.open() as f:
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or ())
    if path_column not in header:
      raise ValueError(f"{path}: no column {path_column!r} (it has {header})")
    wanted = list(columns) or [c for c in header if c != path_column]
    missing = [c for c in wanted if c not in header]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing} (it has {header})")
    values: dict[str, dict[str, float]] = {c: {} for c in wanted}
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
      # As the builders store an image's id: a normalised relative path.
      image = posixpath.normpath((row[path_column] or "").strip().replace("\\", "/"))
      if image in seen:
        raise ValueError(f"{path}, row {line}: {image!r} again (first in row {seen[image]})")
      seen[image] = line
      for column in wanted:
        cell = (row[column] or "").strip()
        try:
          values[column][image] = float(cell) if cell else float("nan")
        except ValueError:
          raise ValueError(
            f"{path}, row {line}: column {column!r} holds {cell!r}, not a number"
          ) from None
  return values


def load(workdir: epath.PathLike) -> tuple[specs.PretrainSpec, Weights]:
  """The pretraining spec of `workdir`'s config.json and its latest weights."""
  workdir = epath.Path(workdir)
  config_path = workdir / run_files.CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: not a pretraining workdir?")
  config = ml_collections.ConfigDict(run_files.upgrade(run_files.read_json(config_path)))
  spec = specs.from_config(specs.PretrainSpec, config)
  params, batch_stats, step = checkpoint.load_weights(workdir)
  num_classes = resnet.head_classes(params)
  model = resnet.create_model(dataclasses.replace(spec.model, num_classes=num_classes))
  return spec, Weights(model.apply, params, batch_stats, step)


def probe_workdir(
  workdir: epath.PathLike,
  attributes: Mapping[str, Mapping[str, float]],
  *,
  source: str = "the attributes",
  data_dir: str = "",
  max_images: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """The probe's metrics and each attribute's R² for the latest checkpoint of `workdir`.

  Args:
    workdir: a pretraining workdir (config.json and checkpoints/).
    attributes: {column: {image id: value}}, as `read_attributes` returns.
    source: where `attributes` came from, for errors (e.g. the CSV's path).
    data_dir: the probe set's TFDS data_dir ("" : the config's).
    max_images: the probe set's size (None: the config's `probe.max_images`).
    mesh: the device mesh (None: all devices).

  Raises:
    ValueError: naming `source`, the workdir and an example, for a probe image with no row.
  """
  spec, weights = load(workdir)
  if not spec.probe.dataset:
    raise specs.ConfigError(f"{workdir}: its config has no probe (probe.dataset is empty)")
  probe_spec = dataclasses.replace(
    spec.probe,
    data_dir=data_dir or spec.probe.data_dir or spec.dataset.data_dir,
    max_images=max_images or spec.probe.max_images,
  )
  mesh = mesh or sharding.create_mesh()
  the_probe = probe.Probe(
    probe_spec,
    preset=spec.augment.preset,
    image_size=spec.augment.image_size,
    labels=spec.labels,
    mesh=mesh,
  )
  placed = dataclasses.replace(
    weights,
    params=sharding.replicate(weights.params, mesh),
    batch_stats=sharding.replicate(weights.batch_stats, mesh),
  )
  features = the_probe.features(placed)
  labels = the_probe.labels
  ids = [i.decode() if isinstance(i, bytes) else str(i) for i in labels["image_id"]]
  scores = probe.score(
    features, labels, task=probe_spec.task, names=the_probe.names, k=probe_spec.k
  )
  r2 = {}
  for column, by_image in attributes.items():
    unknown = [i for i in ids if i not in by_image]
    if unknown:
      raise ValueError(
        f"{source}: column {column!r} has no row for {len(unknown)} image(s) of the probe set of "
        f"{workdir}, e.g. {unknown[0]!r}"
      )
    values = np.array([by_image[i] for i in ids], np.float64)
    r2[column] = probe.attribute_r2(features, labels["patient_id"], values, probe_spec.k)
  return {
    "workdir": str(workdir),
    "step": weights.step,
    "images": len(ids),
    "k": probe_spec.k,
    "probe": scores,
    "r2": r2,
  }


def format_table(reports: Sequence[Mapping[str, Any]]) -> str:
  """One row per workdir: step, the probe's metrics, then each attribute's R²."""
  # Columns in order of first appearance over all reports (a missing one prints nan).
  metrics = list(dict.fromkeys(m for r in reports for m in r["probe"]))
  columns = list(dict.fromkeys(c for r in reports for c in r["r2"]))
  header = ["workdir", "step", *metrics, *(f"r2/{c}" for c in columns)]
  rows = [
    [run_files.short(r["workdir"]), str(r["step"])]
    + [f"{r['probe'].get(m, float('nan')):.3f}" for m in metrics]
    + [f"{r['r2'].get(c, float('nan')):+.3f}" for c in columns]
    for r in reports
  ]
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  return "\n".join(
    "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in [header, *rows]
  )


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_multi_string("workdir", None, "Pretraining workdir(s) (config.json, checkpoints).")
  flags.DEFINE_string("attributes", None, "CSV with one row per image and numeric columns.")
  flags.DEFINE_string("path_column", "Path", "Column of the image id (the dataset's image_id).")
  flags.DEFINE_list("columns", [], "Attribute columns to probe (default: all but the path).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir of the probe set (default: the config's).")
  flags.DEFINE_integer("max_images", None, "Probe images (default: the config's probe.max_images).")
  flags.DEFINE_string("out", "", "Also write the reports as JSON here.")
  flags.mark_flags_as_required(["workdir", "attributes"])


def main() -> None:
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only decodes; keep it off accelerators.
  attributes = read_attributes(FLAGS.attributes, FLAGS.path_column, FLAGS.columns)
  mesh = sharding.create_mesh()
  reports = []
  for workdir in FLAGS.workdir:
    reports.append(
      probe_workdir(
        workdir,
        attributes,
        source=FLAGS.attributes,
        data_dir=FLAGS.data_dir,
        max_images=FLAGS.max_images,
        mesh=mesh,
      )
    )
    logging.info("%s: %s", workdir, reports[-1])
  print(format_table(reports))
  if FLAGS.out:
    epath.Path(FLAGS.out).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  app.run(main, define_flags)

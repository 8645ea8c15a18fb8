"""A fine-tuned model's evaluations: in distribution and on every shift dataset of its config.

Each evaluation predicts every (view-filtered) image of its split, saves the per-image
predictions (`predictions/<key>.npz`, what the sweep compares across inits) and scores them with
bootstrap CIs over patients (`evaluation.metrics_fn`, `bootstrap.metrics_with_ci`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from micle_jax import specs
from micle_jax.data import finetune_input, input_pipeline, tasks
from micle_jax.eval import bootstrap, evaluation
from micle_jax.runtime import sharding

# (state, global images) -> per-image probabilities: the compiled predict step.
PredictFn = Callable[[Any, jax.Array], jax.Array]


def predict(
  spec: specs.FinetuneSpec,
  state: Any,
  mesh: jax.sharding.Mesh,
  info: input_pipeline.DatasetInfo,
  label_fn: tasks.LabelFn,
  names: tuple[str, ...],
  predict_fn: PredictFn,
) -> evaluation.Predictions:
  """Probabilities, labels and ids of every (view-filtered) example of `info`'s split, on every
  process."""
  parts: dict[str, list[np.ndarray]] = {}
  for batch in finetune_input.eval_batches(
    info,
    info.split,
    label_fn=label_fn,
    image_size=spec.augment.image_size,
    preset=spec.augment.preset,
    batch_size=spec.eval_batch_size,
    mesh=mesh,
  ):
    images = sharding.make_global_batch(batch.pop("image"), mesh)
    batch["probs"] = sharding.to_host(predict_fn(state, images))
    keep = batch.pop("valid") > 0
    for key, value in batch.items():
      parts.setdefault(key, []).append(np.asarray(value)[keep])
  out = {k: np.concatenate(v) for k, v in parts.items()}
  for key in ("image_id", "case_id", "patient_id", "study_id"):
    out[key] = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in out[key]])
  return evaluation.Predictions(task=tasks.get(spec.labels.task).loss, names=tuple(names), **out)


def evaluate(
  spec: specs.FinetuneSpec,
  state: Any,
  mesh: jax.sharding.Mesh,
  workdir: epath.Path,
  target: finetune_input.EvalTarget,
  names: tuple[str, ...],
  predict_fn: PredictFn,
) -> dict[str, Any]:
  """Predicts `target`, saves the predictions, and scores them with bootstrap CIs over units."""
  info = input_pipeline.open_dataset(
    target.name,
    target.split,
    target.data_dir or None,
    specs.LabelSpec(),
    target.views,
    views_key=target.views_key,
  )
  task = tasks.get(target.task)
  task.check(info.builder.info.features, target.name)
  labels = dataclasses.replace(spec.labels, task=target.task)
  eval_names = task.output_names(info.builder.info.features, labels)
  if tuple(eval_names) != tuple(names):
    raise ValueError(
      f"{target.name}:{target.split} labels {eval_names} do not match the model's {names}"
    )
  preds = predict(spec, state, mesh, info, task.label_fn(labels), names, predict_fn)
  if jax.process_index() == 0:
    evaluation.save_predictions(evaluation.predictions_path(workdir, target.key), preds)
  units, fn = evaluation.metrics_fn(preds, spec.eval_aggregation)
  metrics = bootstrap.metrics_with_ci(
    fn, len(units), num_samples=spec.bootstrap_samples, seed=spec.seed
  )
  return {
    "dataset": f"{target.name}:{target.split}",
    "views": target.views,
    "num_images": len(preds.image_id),
    "num_cases": len(units),
    "metrics": evaluation.undefined_as_none(metrics),
  }


def evaluate_all(
  spec: specs.FinetuneSpec,
  state: Any,
  mesh: jax.sharding.Mesh,
  workdir: epath.Path,
  names: tuple[str, ...],
  predict_fn: PredictFn,
) -> dict[str, dict[str, Any]]:
  """{target key: `evaluate`'s result} for every target of the config, in order."""
  return {
    target.key: evaluate(spec, state, mesh, workdir, target, names, predict_fn)
    for target in finetune_input.eval_targets(spec)
  }

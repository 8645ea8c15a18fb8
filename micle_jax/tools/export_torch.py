"""Exports a checkpoint's weights as a PyTorch state_dict (safetensors) with a JSON sidecar.

Usage:

  python -m micle_jax.export_torch --checkpoint=DIR --out=FILE.safetensors

`--checkpoint` is a pretraining or fine-tuning workdir (its latest step), its `checkpoints/`
folder or one step folder in it, or a converted SimCLRv2 checkpoint (`convert_simclr`'s output).
The architecture comes from the workdir's `config.json` (its `model` section; a fine-tuning
workdir's `results.json` adds the label names) or the conversion's `conversion.json`, and is
checked leaf by leaf against the weights: a checkpoint of another architecture fails naming the
file. `num_classes` is read from the supervised head's weights.

`FILE.safetensors` holds the float32 state_dict of `micle_jax.tools.torch_resnet.SimCLRResNet`
(torchvision's key names for the backbone, see that module); `FILE.json` (also kept in the
safetensors metadata) holds the architecture, the label names when known, and the input
convention: RGB in [0, 1], NCHW (the Flax model takes NHWC), no mean/std normalisation. Load it
with `torch_resnet.from_export(FILE.safetensors)`. docs/export_torch.md has the details and how
to load the backbone into torchvision.
"""

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from etils import epath
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from micle_jax import app, specs
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint as checkpoint_lib
from micle_jax.runtime import run_files
from micle_jax.tools import torch_names
from micle_jax.tools.torch_names import ExportError

# As in micle_jax.tools.torch_resnet, which this module does not import (exporting needs no torch).
EXPORT_FORMAT = "micle_jax.export_torch/1"
METADATA_KEY = "micle_jax_export"
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)
SUFFIX = ".safetensors"
INPUT_CONVENTION = {
  "layout": "NCHW",
  "channels": "RGB",
  "dtype": "float32",
  "range": [0.0, 1.0],
  "mean": None,
  "std": None,
  "note": "No mean/std normalisation (as in SimCLR). The Flax model takes NHWC: "
  "x_torch = x_nhwc.permute(0, 3, 1, 2).",
}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the weights and their architecture come from.

  Attributes:
    checkpoint: the `--checkpoint` path (absolute).
    kind: "pretrain", "finetune" or "simclr_conversion".
    arch_file: the config.json or conversion.json the architecture was read from.
    model: the `model` spec (num_classes not yet read from the weights).
    labels: the supervised head's output names (fine-tuning), else None.
    task: the label task (`labels.task` of the config), else None.
    image_size: the training view's side in pixels, when known.
    preset: the augmentation preset (which picks the evaluation view), when known.
  """

  checkpoint: epath.Path
  kind: str
  arch_file: epath.Path
  model: specs.ModelSpec
  labels: list[str] | None
  task: str | None
  image_size: int | None
  preset: str | None = None


def _read_json(path: epath.Path) -> dict[str, Any]:
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ExportError(f"{path}: cannot be read as JSON ({checkpoint_lib.reason(e)})") from e
  if not isinstance(value, dict):
    raise ExportError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _model_spec(section: Any, path: epath.Path) -> specs.ModelSpec:
  if not isinstance(section, Mapping):
    raise ExportError(f"{path}: no 'model' section, so the architecture is unknown")
  try:
    return specs.from_config(specs.ModelSpec, section, "model")
  except specs.ConfigError as e:
    raise ExportError(f"{path}: unknown architecture: {e}") from e


def locate(checkpoint: epath.PathLike) -> Source:
  """Finds the architecture of `checkpoint` (a workdir, checkpoints/, a step, a conversion).

  Raises:
    FileNotFoundError: `checkpoint` does not exist, or has neither config.json nor
      conversion.json.
    ExportError: the file that should describe the architecture does not (no `model`
      section, a depth outside specs.DEPTHS, an unknown key).
  """
  path = checkpoint_lib.absolute(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f"--checkpoint={path}: no such file or directory")
  run_dir = run_files.run_dir(path)
  conversion, config_path = run_dir / run_files.CONVERSION_FILE, run_dir / run_files.CONFIG_FILE
  if conversion.exists():
    report = _read_json(conversion)
    spec = _model_spec(report.get("model"), conversion)
    kind = "torch_import" if report.get("converter") == "import_torch" else "simclr_conversion"
    return Source(path, kind, conversion, spec, None, None, 224)
  if not config_path.exists():
    raise FileNotFoundError(
      f"--checkpoint={path}: no {run_files.CONFIG_FILE} or {run_files.CONVERSION_FILE} in {run_dir}, so "
      "the architecture is unknown (pass a workdir, its checkpoints/ or a step in it, or a "
      "convert_simclr output)"
    )
  config = run_files.upgrade(_read_json(config_path))
  spec = _model_spec(config.get("model"), config_path)
  results_path = run_dir / run_files.RESULTS_FILE
  results = _read_json(results_path) if results_path.exists() else {}
  finetune = results_path.exists() or "mode" in config
  labels = results.get("labels")
  task = results.get("task") or (config.get("labels") or {}).get("task")
  augment = config.get("augment") or {}
  kind = "finetune" if finetune else "pretrain"
  labels = list(labels) if labels else None
  return Source(
    path, kind, config_path, spec, labels, task, augment.get("image_size"), augment.get("preset")
  )


def _load(source: Source) -> tuple[dict[str, Any], dict[str, Any], int]:
  try:
    return checkpoint_lib.load_weights(source.checkpoint)
  except FileNotFoundError as e:
    why = str(e).split(": ", 1)[-1]  # load_weights names the path as init_from=...
    raise FileNotFoundError(f"--checkpoint={source.checkpoint}: {why}") from e
  except ValueError as e:
    raise ExportError(f"--checkpoint={source.checkpoint}: {e}") from e


def expected_shapes(spec: specs.ModelSpec) -> dict[str, tuple[int, ...]]:
  """Every leaf of the Flax model's {'params', 'batch_stats'} ("params/backbone/...") and shape."""
  model = resnet.create_model(spec)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_weights(
  spec: specs.ModelSpec, params: Mapping[str, Any], batch_stats: Mapping[str, Any], where: str
) -> None:
  """Raises ExportError listing every leaf the weights lack, hold extra, or hold with another
  shape than the architecture `spec` has."""
  expected = expected_shapes(spec)
  found = {
    path: tuple(np.shape(leaf))
    for path, leaf in traverse_util.flatten_dict(
      {"params": params, "batch_stats": batch_stats}, sep="/"
    ).items()
  }
  order = lambda p: (not p.startswith("params/"), p)  # noqa: E731 -- parameters first
  problems = [
    f"  {p}: expected {list(s)}, the checkpoint has {list(found[p]) if p in found else 'none'}"
    for p, s in sorted(expected.items(), key=lambda item: order(item[0]))
    if found.get(p) != s
  ] + [
    f"  {p} {list(s)}: not in the architecture"
    for p, s in sorted(found.items(), key=lambda item: order(item[0]))
    if p not in expected
  ]
  if problems:
    shown = problems[:20] + ([f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ExportError(f"{where} ({len(problems)} mismatched leaves):\n" + "\n".join(shown))


def architecture(spec: specs.ModelSpec) -> dict[str, Any]:
  """The sidecar's "architecture": `torch_resnet.Architecture`'s fields, then derived values."""
  built = spec.num_proj_layers if spec.proj_layers_kept < 0 else spec.proj_layers_kept
  kind = resnet.RESNET_LAYERS[spec.depth][0]
  features = (1 if kind == "basic" else 4) * max(1, int(round(512 * spec.width)))
  last = spec.proj_out_dim if built and built == spec.num_proj_layers else features
  same = spec.width == 1 and spec.sk_ratio == 0 and spec.stem == "imagenet"
  return {
    "depth": spec.depth,
    "width": spec.width,
    "sk_ratio": spec.sk_ratio,
    "stem": spec.stem,
    "num_proj_layers": spec.num_proj_layers,
    "proj_out_dim": spec.proj_out_dim,
    "proj_layers_kept": spec.proj_layers_kept,
    "supervised_input_layer": spec.supervised_input_layer,
    "num_classes": spec.num_classes,
    "variant": spec.variant,
    "block": kind,
    "num_features": features,
    "projection_layers_built": built,
    "projection_dim": last,
    "torchvision": f"resnet{spec.depth}" if same and spec.depth in TORCHVISION_DEPTHS else None,
  }


def _label_activation(task: str | None) -> str | None:
  if not task or task == "none":
    return None
  from micle_jax.data import tasks  # imports TensorFlow: only when a task is named

  if task not in tasks.REGISTRY:
    return None
  return {"multiclass": "softmax", "multilabel": "sigmoid"}.get(tasks.get(task).loss)


def sidecar(
  source: Source, spec: specs.ModelSpec, step: int, out: epath.Path, num_tensors: int
) -> dict[str, Any]:
  """The JSON written beside the weights (and into their metadata)."""
  arch = architecture(spec)
  notes = []
  if source.kind == "pretrain" and spec.num_classes:
    notes.append(
      "The supervised head of a pretraining checkpoint is its linear monitor (trained on "
      "stop-gradient features with the labels of the whole training split)."
    )
  if source.kind == "simclr_conversion":
    notes.append(
      "supervised_input_layer is not stored in SimCLR weights (fine-tuned SimCLRv2 checkpoints "
      "use 1); pass --supervised_input_layer to set it."
    )
  if spec.dtype != "float32":
    notes.append(f"Trained with compute dtype {spec.dtype}; the weights are float32.")
  if spec.variant == "torchvision":
    notes.append(
      "variant 'torchvision': the backbone loads into stock torchvision as it is (no "
      "make_torchvision_exact), which expects inputs normalised with ImageNet's mean and std; "
      "SimCLRResNet normalises its [0, 1] input itself."
    )
  return {
    "format": EXPORT_FORMAT,
    "weights": out.name,
    "source": {
      "checkpoint": str(source.checkpoint),
      "kind": source.kind,
      "architecture_from": str(source.arch_file),
      "step": int(step),
    },
    "architecture": arch,
    "labels": source.labels,
    "task": source.task,
    "outputs": {
      "features": arch["num_features"],
      "projection": arch["projection_dim"],
      "logits": spec.num_classes or None,
      "logits_activation": _label_activation(source.task) if spec.num_classes else None,
    },
    "input": {**INPUT_CONVENTION, "image_size": source.image_size, "preset": source.preset},
    "state_dict": {
      "num_tensors": num_tensors,
      "supervised_head": torch_names.supervised_head_name(spec) if spec.num_classes else None,
      "projection_head": "projection_head.{j}.linear, .bn"
      if arch["projection_layers_built"]
      else None,
      "torchvision": arch["torchvision"],
    },
    "notes": notes,
  }


def export(
  checkpoint: epath.PathLike,
  out: epath.PathLike,
  *,
  supervised_input_layer: int | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes `out` (.safetensors) and its `.json` sidecar from `checkpoint`; returns the sidecar.

  Args:
    checkpoint: a pretraining/fine-tuning workdir, its checkpoints/ folder or a step in it, or
      a converted SimCLRv2 checkpoint.
    out: the weights file, ending in .safetensors; the sidecar goes beside it.
    supervised_input_layer: overrides the source's (conversions do not record it; default 0).
    overwrite: replace existing files instead of failing.

  Raises:
    FileNotFoundError: no such checkpoint, or no config.json/conversion.json for it.
    ExportError: an unknown architecture, or weights that do not fit it (naming the file).
  """
  source = locate(checkpoint)
  out = checkpoint_lib.absolute(out)
  if out.suffix != SUFFIX:
    raise ExportError(f"--out={out}: the weights file must end in {SUFFIX}")
  json_path = out.with_suffix(".json")
  existing = [str(p) for p in (out, json_path) if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(f"--out={out}: {' and '.join(existing)} exist; pass --overwrite")
  params, batch_stats, step = _load(source)
  spec = dataclasses.replace(source.model, num_classes=resnet.head_classes(params))
  if supervised_input_layer is not None:
    try:
      spec = dataclasses.replace(spec, supervised_input_layer=supervised_input_layer)
    except specs.ConfigError as e:
      raise ExportError(f"--supervised_input_layer={supervised_input_layer}: {e}") from e
  check_weights(
    spec,
    params,
    batch_stats,
    f"--checkpoint={source.checkpoint} (step {step}) does not fit the architecture in "
    f"{source.arch_file}",
  )
  tensors = torch_names.torch_state_dict(params, batch_stats, spec)
  info = sidecar(source, spec, step, out, len(tensors))
  out.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(info, indent=2) + "\n")
  safetensors_numpy.save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(info)})
  os.chmod(out, os.stat(json_path).st_mode & 0o777)  # safetensors writes 0600; as the .json
  logging.info("Wrote %s (%d tensors) and %s", out, len(tensors), json_path)
  return info


def define_flags() -> None:
  flags.DEFINE_string(
    "checkpoint", None, "A workdir, its checkpoints/ or a step in it, or a convert_simclr output."
  )
  flags.DEFINE_string("out", None, "The weights file (.safetensors); FILE.json goes beside it.")
  flags.DEFINE_integer(
    "supervised_input_layer", None, "Overrides the source's (SimCLR conversions: default 0)."
  )
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main() -> None:
  values = flags.FLAGS
  try:
    info = export(
      values.checkpoint,
      values.out,
      supervised_input_layer=values.supervised_input_layer,
      overwrite=values.overwrite,
    )
  except (FileNotFoundError, FileExistsError, ExportError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps({"weights": str(values.out), "architecture": info["architecture"]}))


if __name__ == "__main__":
  app.run(main, define_flags)

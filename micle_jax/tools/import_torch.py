"""Imports a torchvision or timm ResNet state_dict as a weights-only Orbax checkpoint of our model.

Usage:

  python -m micle_jax.import_torch --weights=resnet50.pth --arch=resnet50 --out=DIR

`--weights` is a state_dict of torchvision's or timm's `resnet{18,34,50,101,152}`: a `.pth`/`.pt`
written by `torch.save` (also a training checkpoint that nests it under `state_dict` or `model`,
or under the entry `--container` names) or a `.safetensors` file. Neither torch nor safetensors is needed to read it
(`micle_jax.tools.torch_files`). `--arch` is checked against what the tensors hold (the blocks of
each layer); leave it out to infer it.

Strict: every tensor of the file is used exactly once (BatchNorm's `num_batches_tracked` counters
are skipped by rule), every parameter and BatchNorm statistic of the model is filled, and every
shape matches; otherwise the import fails with one line naming the file and each key at fault.

`DIR` receives the checkpoint (`runtime.checkpoint.save_weights`, which `init_from` reads) and
`conversion.json`: the source file and its SHA-256, the architecture, every tensor mapped (torch
key -> Flax path), the skipped ones, and the `model` keys of a config that uses the weights, among
them `variant: "torchvision"`: our ResNet then computes exactly as torchvision's (ImageNet mean/std
normalisation inside the model, the stem's symmetric max-pool padding, no projection shortcut in
ResNet-18/34's first block; `models/resnet.py`). ImageNet's classifier `fc` is kept as the
supervised head (`head_supervised`), which fine-tuning never restores. docs/import_torch.md has the
real weights' names and the paper's comparison with them.
"""

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from etils import epath
from flax import traverse_util

from micle_jax import app, specs
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint as checkpoint_lib
from micle_jax.runtime import run_files
from micle_jax.tools import torch_files, torch_names

ARCHS = {f"resnet{d}": d for d in (18, 34, 50, 101, 152)}
SKIP_COUNTER = "BatchNorm's num_batches_tracked (a training counter, no weight)"
# What a config must set to use the weights (the study applies these).
MODEL_KEYS = ("depth", "width", "sk_ratio", "stem", "variant")


class WeightsMismatchError(ValueError):
  """A file that is not a torchvision/timm ResNet of the architecture asked for."""


def infer_depth(tensors: Mapping[str, np.ndarray], file: str) -> int:
  """The depth whose blocks per layer the keys hold (layer{g}.{b}.*; conv3 means bottlenecks)."""
  if "conv1.weight" not in tensors:
    if any(k.startswith("conv1.0.") for k in tensors):
      raise WeightsMismatchError(
        f"{file}: a ResNet-D stem (conv1.0.weight: timm's resnet*d), not torchvision's ResNet; "
        f"import supports {', '.join(ARCHS)}"
      )
    raise WeightsMismatchError(
      f"{file}: not a torchvision/timm ResNet state_dict (no conv1.weight; first keys "
      f"{sorted(tensors)[:4]})"
    )
  blocks: dict[int, set[int]] = {g: set() for g in range(1, 5)}
  bottleneck = False
  for key in tensors:
    match = re.match(r"layer([1-4])\.(\d+)\.(\w+)", key)
    if match:
      blocks[int(match[1])].add(int(match[2]))
      bottleneck |= match[3] == "conv3"
  layers = tuple(len(blocks[g]) for g in range(1, 5))
  kind = "bottleneck" if bottleneck else "basic"
  for depth in ARCHS.values():
    if resnet.RESNET_LAYERS[depth] == (kind, layers):
      return depth
  raise WeightsMismatchError(
    f"{file}: {kind} blocks per layer {layers} fit none of {', '.join(ARCHS)}"
  )


def model_spec(depth: int, num_classes: int) -> specs.ModelSpec:
  """The model the weights fill: torchvision's ResNet, no projection head, `fc` as the head."""
  return specs.ModelSpec(
    depth=depth,
    width=1.0,
    stem="imagenet",
    variant="torchvision",
    num_proj_layers=0,
    num_classes=num_classes,
  )


def _target_leaves(spec: specs.ModelSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
  model = resnet.create_model(spec)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  flat = traverse_util.flatten_dict(dict(shapes))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
  """OIHW conv weight -> HWIO kernel, [out, in] linear weight -> [in, out]; others as they are."""
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def map_tensors(
  tensors: Mapping[str, np.ndarray], spec: specs.ModelSpec, file: str
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, str], dict[str, str]]:
  """(Flax leaves, {torch key: Flax path}, {skipped torch key: rule}).

  Raises:
    WeightsMismatchError: one line naming the file and every missing, extra, misshapen or non-float key.
  """
  leaves, mapping, problems, seen = {}, {}, [], set()
  for path, shape in sorted(_target_leaves(spec).items()):
    key = torch_names.torch_key(path, spec)
    value = tensors.get(key)
    seen.add(key)
    if value is None:
      problems.append(f"missing {key} (for {'/'.join(path)} {list(shape)})")
      continue
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      problems.append(f"{key} is {value.dtype.name}, not a float")
      continue
    converted = _to_flax(np.asarray(value, np.float32), path[-1])
    if tuple(converted.shape) != shape:
      problems.append(
        f"{key} has shape {list(value.shape)}, {'/'.join(path)} needs {list(shape)} (as Flax)"
      )
      continue
    leaves[path] = converted
    mapping[key] = "/".join(path)
  skipped = {k: SKIP_COUNTER for k in tensors if k.endswith(".num_batches_tracked")}
  problems += [
    f"extra {k} {list(tensors[k].shape)} (no place in {spec_name(spec)})"
    for k in sorted(set(tensors) - seen - set(skipped))
  ]
  if problems:
    shown = "; ".join(problems[:12]) + (
      f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
    )
    raise WeightsMismatchError(f"{file}: does not fit torchvision's {spec_name(spec)}: {shown}")
  return leaves, mapping, skipped


def spec_name(spec: specs.ModelSpec) -> str:
  return f"resnet{spec.depth}"


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def import_weights(
  weights: str, out: str, *, arch: str | None = None, container: str | None = None
) -> dict[str, Any]:
  """Imports `weights` into a weights-only Orbax checkpoint in `out`; returns conversion.json.

  `container`: the entry of a training checkpoint that holds the weights (default: the first of
  `torch_files.CONTAINER_KEYS` found).

  Raises:
    WeightsMismatchError: the file is not a torchvision/timm ResNet (of `arch`, when given).
    torch_files.WeightsFileError: the file cannot be read as PyTorch weights.
  """
  if arch is not None and arch not in ARCHS:
    raise WeightsMismatchError(f"--arch={arch!r} not in {list(ARCHS)}")
  out_dir = epath.Path(out)
  if (out_dir / checkpoint_lib.CHECKPOINT_DIR).exists():
    raise FileExistsError(f"--out={out} already holds a checkpoint; choose a new directory")
  source = epath.Path(weights).absolute()
  tensors, found = torch_files.read_tensors(source, container)
  depth = infer_depth(tensors, str(source))
  if arch is not None and ARCHS[arch] != depth:
    raise WeightsMismatchError(f"{source}: holds a resnet{depth}, not --arch={arch}")
  fc = tensors.get("fc.weight")
  spec = model_spec(depth, int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 0)
  leaves, mapping, skipped = map_tensors(tensors, spec, str(source))
  model = {key: getattr(spec, key) for key in MODEL_KEYS}
  model |= {"num_proj_layers": 0, "proj_out_dim": spec.proj_out_dim}
  report = {
    "converter": "import_torch",
    "source": {
      "file": str(source),
      "sha256": _sha256(source),
      "format": found["format"],
      "container": found["container"],
      "dtypes": sorted({str(v.dtype) for v in tensors.values()}),
    },
    "architecture": spec_name(spec),
    "num_classes": spec.num_classes,
    "model": model,
    "tensors": {"total": len(tensors), "used": len(mapping), "skipped": len(skipped)},
    "mapping": mapping,
    "skipped": skipped,
    "notes": [
      "Set the `model` keys in configs that use these weights (depth, width, sk_ratio, stem, "
      "variant); `init_from` refuses them with another model.variant.",
      "Inputs stay RGB in [0, 1]: the torchvision variant normalises with ImageNet's mean and std "
      "inside the model.",
      f"fc ({spec.num_classes} classes) is the supervised head; fine-tuning starts a new one, and "
      "pretraining from these weights needs init_projection_head=False (there is no projection "
      "head).",
    ],
  }
  # The record first: weights without it would load under any model.variant.
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / run_files.CONVERSION_FILE).write_text(json.dumps(report, indent=2) + "\n")
  tree = traverse_util.unflatten_dict(leaves)
  checkpoint_lib.save_weights(out_dir, tree["params"], tree["batch_stats"])
  logging.info("Wrote %s: %s from %s", out_dir, spec_name(spec), source)
  return report


def define_flags() -> None:
  flags.DEFINE_string(
    "weights", None, "torchvision/timm ResNet state_dict: .pth, .pt, .safetensors"
  )
  flags.DEFINE_enum(
    "arch", None, list(ARCHS), "Expected architecture (checked; inferred if unset)."
  )
  flags.DEFINE_string("out", None, "New directory for the Orbax checkpoint and conversion.json.")
  flags.DEFINE_string(
    "container", None, "Entry of a training checkpoint holding the weights (e.g. state_dict_ema)."
  )
  flags.mark_flags_as_required(["weights", "out"])


def main() -> None:
  values = flags.FLAGS
  try:
    report = import_weights(
      values.weights, values.out, arch=values.arch, container=values.container
    )
  except (WeightsMismatchError, torch_files.WeightsFileError, OSError) as e:
    sys.exit(f"error: {e}")  # the user's file, not the program: one line says it
  print(json.dumps({"architecture": report["architecture"], "model": report["model"]}))


if __name__ == "__main__":
  app.run(main, define_flags)

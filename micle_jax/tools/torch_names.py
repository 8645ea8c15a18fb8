"""Names of the PyTorch export: a Flax parameter path -> its `torch_resnet.SimCLRResNet` key.

The backbone follows torchvision's ResNet names (`conv1`, `bn1`, `layer{g}.{b}.conv{i}`,
`downsample.{0,1}`; the ResNet-D stem of selective-kernel models uses timm's `conv1.{0,1,3,4,6}`),
the projection head `projection_head.{j}.{linear,bn}`, the supervised head `fc` (on the backbone
features) or `head_supervised` (on a projection layer). `torch_state_dict` converts whole trees:
conv kernels HWIO -> OIHW, dense kernels transposed, BatchNorm to torch's buffers.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from micle_jax import specs

Path = tuple[str, ...]


class ExportError(ValueError):
  """A checkpoint that cannot be exported; the message names the file at fault."""


def _stem_name(kind: str, index: int, resnet_d: bool) -> str:
  """Flax stem layer -> torch name (ResNet-D: timm's conv1.{0,1,3,4,6} + bn1)."""
  if not resnet_d:
    return "conv1" if kind == "conv" else "bn1"
  if kind == "conv":
    return f"conv1.{3 * index}"
  return "bn1" if index == 2 else f"conv1.{3 * index + 1}"


def torch_module_name(path: Path, spec: specs.ModelSpec) -> str:
  """The torch module name of a Flax module path (`('backbone', 'stem_conv_0')` -> `conv1`).

  Raises:
    ExportError: for a path that is not part of the SimCLR ResNet.
  """
  resnet_d = spec.sk_ratio > 0
  head, rest = path[0], path[1:]
  if head == "head_supervised" and not rest:
    return supervised_head_name(spec)
  if head == "projection_head" and len(rest) == 1:
    match = re.fullmatch(r"(dense|bn)_(\d+)", rest[0])
    if match:
      return f"projection_head.{match[2]}.{'linear' if match[1] == 'dense' else 'bn'}"
  if head == "backbone" and rest:
    stem = re.fullmatch(r"stem_(conv|bn)_(\d)", rest[0])
    if stem and len(rest) == 1:
      return _stem_name(stem[1], int(stem[2]), resnet_d and spec.stem == "imagenet")
    block = re.fullmatch(r"block_group_(\d)_block_(\d+)", rest[0])
    if block and len(rest) >= 2:
      prefix, layer = f"layer{int(block[1]) + 1}.{block[2]}", rest[1:]
      if layer[0] == "shortcut" and len(layer) == 2 and layer[1] in ("conv", "bn"):
        return f"{prefix}.downsample.{(layer[1] == 'bn') + resnet_d}"
      if layer[0] == "sk" and len(layer) == 2:
        return f"{prefix}.sk.{layer[1]}"
      main = re.fullmatch(r"(conv|bn)_(\d)", layer[0])
      if main and len(layer) == 1:
        return f"{prefix}.{main[1]}{int(main[2]) + 1}"
  raise ExportError(f"{'/'.join(path)}: not a layer of the SimCLR ResNet")


# A Flax leaf -> its torch name (a kernel is a conv's or linear layer's `weight`).
LEAF_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def torch_key(path: Path, spec: specs.ModelSpec) -> str:
  """The state_dict key of one Flax leaf, `('params', 'backbone', 'stem_conv_0', 'kernel')` ->
  `conv1.weight` (the import maps every leaf of a model through it)."""
  return f"{torch_module_name(path[1:-1], spec)}.{LEAF_NAMES[path[-1]]}"


def torch_state_dict(
  params: Mapping[str, Any], batch_stats: Mapping[str, Any], spec: specs.ModelSpec
) -> dict[str, np.ndarray]:
  """The state_dict of `torch_resnet.SimCLRResNet` (NumPy arrays) from Flax's trees.

  Conv kernels HWIO -> OIHW, dense kernels [in, out] -> [out, in]; BatchNorm scale/bias/mean/var
  -> weight/bias/running_mean/running_var, plus `num_batches_tracked` = 0 (as in a fresh torch
  model: it only matters for momentum=None).
  """
  flat_params = traverse_util.flatten_dict(params)
  flat_stats = traverse_util.flatten_dict(batch_stats)
  modules: dict[Path, dict[str, Any]] = {}
  for tree in (flat_params, flat_stats):
    for path, value in tree.items():
      modules.setdefault(path[:-1], {})[path[-1]] = np.asarray(value, np.float32)
  out: dict[str, np.ndarray] = {}
  for path, leaves in sorted(modules.items()):
    name = torch_module_name(path, spec)
    kernel = leaves.pop("kernel", None)
    if kernel is not None and kernel.ndim == 4:
      out[f"{name}.weight"] = kernel.transpose(3, 2, 0, 1)
    elif kernel is not None and kernel.ndim == 2:
      out[f"{name}.weight"] = kernel.T
      if "bias" in leaves:
        out[f"{name}.bias"] = leaves.pop("bias")
    elif {"scale", "mean", "var"} <= set(leaves):
      out[f"{name}.weight"] = leaves.pop("scale")
      if "bias" in leaves:
        out[f"{name}.bias"] = leaves.pop("bias")
      out[f"{name}.running_mean"] = leaves.pop("mean")
      out[f"{name}.running_var"] = leaves.pop("var")
      out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
    if leaves or (kernel is None and f"{name}.weight" not in out):
      raise ExportError(f"{'/'.join(path)}: unexpected leaves {sorted(leaves)} for {name}")
  return {k: np.asarray(v, order="C") for k, v in out.items()}


def supervised_head_name(spec: specs.ModelSpec) -> str:
  """`fc` for a head on the backbone features, `head_supervised` for one on a projection layer."""
  return "fc" if spec.supervised_input_layer == 0 else "head_supervised"

"""Converts SimCLR(v2) TensorFlow weights into a weights-only Orbax checkpoint of our model.

Usage:

  python -m micle_jax.convert_simclr --checkpoint=r50_1x_sk0/model.ckpt-250228 --out=DIR

`--checkpoint` is a TF1 checkpoint prefix (`model.ckpt-NNNN`), a TF2 object-based checkpoint (a
prefix such as `ckpt-NNNN`, or the directory holding its `checkpoint` file), or a SavedModel
directory (its `variables/variables` checkpoint is read; the graph is never loaded). Depth,
width, selective kernels (and their ratio), the projection head and the supervised head are
inferred from the tensors; `--depth`, `--width` and `--sk_ratio` are checked against them.

Strict: every source tensor is used exactly once or skipped by a documented rule (optimizer
slots, step counters, the other weight copy of `--variables`, checkpoint metadata), every target
leaf is filled and every shape matches; otherwise the conversion fails listing all mismatches.
`DIR` receives the checkpoint (`micle_jax.runtime.checkpoint.save_weights`, readable with
`load_weights`) and `conversion.json`, which holds what was found and the `model` config keys to
set. docs/convert_simclr.md maps the published checkpoints to our configs.
"""

import collections
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import flags, logging
from etils import epath
from flax import traverse_util
from tensorflow.core.protobuf import trackable_object_graph_pb2

from micle_jax import app, specs
from micle_jax.models import resnet
from micle_jax.runtime import checkpoint as checkpoint_lib
from micle_jax.runtime import run_files
from micle_jax.tools import simclr_tf_names as names

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
DEFAULT_SK_RATIO = 0.0625  # SimCLRv2's value; the fc widths only pin it down above SK_MIN_DIM.
TargetPath = names.TargetPath


class ConversionError(ValueError):
  """The checkpoint does not fit the model; the message lists every mismatch."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A TF checkpoint opened for reading.

  Attributes:
    prefix: the checkpoint prefix read.
    format: 'tf1_checkpoint', 'tf2_checkpoint', 'tf1_saved_model' or 'tf2_saved_model'.
    shapes: every tensor key -> shape.
    dtypes: every tensor key -> tf.DType.
    layout: the model tensors grouped by layer, and the skipped ones.
    reader: the tf.train.CheckpointReader.
  """

  prefix: str
  format: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, Any]
  layout: names.SourceLayout
  reader: Any


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What the checkpoint holds, in our `model` config's terms."""

  depth: int
  width: float
  sk_ratio: float
  num_proj_layers: int
  proj_out_dim: int
  num_classes: int

  def spec(self) -> specs.ModelSpec:
    return specs.ModelSpec(
      depth=self.depth,
      width=self.width,
      sk_ratio=self.sk_ratio,
      stem="imagenet",
      num_proj_layers=self.num_proj_layers,
      proj_out_dim=self.proj_out_dim,
      num_classes=self.num_classes,
    )


def locate_checkpoint(path: str) -> tuple[str, str]:
  """(checkpoint prefix, 'checkpoint' | 'saved_model') for a prefix, checkpoint dir or SavedModel."""
  path = path.rstrip("/")
  if tf.io.gfile.isdir(path):
    variables = f"{path}/variables/variables"
    if tf.io.gfile.exists(f"{variables}.index"):
      return variables, "saved_model"
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest, "checkpoint"
    raise FileNotFoundError(
      f"--checkpoint={path}: a directory without variables/variables.index (SavedModel) or a "
      "`checkpoint` file naming the latest checkpoint; pass a checkpoint prefix instead"
    )
  if tf.io.gfile.exists(f"{path}.index"):
    return path, "checkpoint"
  raise FileNotFoundError(f"--checkpoint={path}: no {path}.index, and not a directory")


def _object_paths(graph: Any, limit: int = 8) -> dict[int, list[str]]:
  """Object-graph node -> up to `limit` paths from the root (aliases give several)."""
  paths: dict[int, list[str]] = collections.defaultdict(list)
  stack = [(0, "", (0,))]
  while stack:
    node_id, path, seen = stack.pop()
    if len(paths[node_id]) >= limit:
      continue
    paths[node_id].append(path)
    for child in graph.nodes[node_id].children:
      if child.node_id not in seen:
        child_path = f"{path}/{child.local_name}" if path else child.local_name
        stack.append((child.node_id, child_path, (*seen, child.node_id)))
  return paths


def _tf2_model_paths(
  reader: Any, keys: list[str], root: str
) -> tuple[dict[str, str], dict[str, str]]:
  """Resolves TF2 keys to object paths below `root`; returns (paths, skipped keys with rules).

  The object graph is read so that aliases resolve (a SavedModel exported by SimCLR stores its
  trainable variables as `trainable_variables_list/N`, which are also `model/...`).
  """
  graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
    reader.get_tensor(OBJECT_GRAPH_KEY)
  )
  node_paths = _object_paths(graph)
  key_paths: dict[str, list[str]] = {}
  for node_id, node in enumerate(graph.nodes):
    for attribute in node.attributes:
      key_paths[attribute.checkpoint_key] = node_paths.get(node_id, [])
  other = next(choice for choice in names.VARIABLE_CHOICES if choice != root)
  paths, skipped = {}, {}
  for key in keys:
    candidates = key_paths.get(key, [key.removesuffix(names.TF2_VALUE)])
    under = sorted((p for p in candidates if p.startswith(f"{root}/")), key=lambda p: (len(p), p))
    if key == OBJECT_GRAPH_KEY or not key.endswith(names.TF2_VALUE):
      skipped[key] = names.SKIP_METADATA
    elif "/.OPTIMIZER_SLOT/" in key:
      skipped[key] = names.SKIP_SLOT
    elif under:
      paths[key] = under[0][len(root) + 1 :]
    elif any(p.startswith(f"{other}/") for p in candidates):
      skipped[key] = names.SKIP_OTHER_COPY
    else:
      skipped[key] = names.SKIP_OUTSIDE
  return paths, skipped


def read_checkpoint(path: str, variables: str = "model") -> Source:
  """Opens a TF1/TF2 checkpoint or SavedModel and groups its tensors by layer."""
  if variables not in names.VARIABLE_CHOICES:
    raise ValueError(f"--variables={variables!r} not in {names.VARIABLE_CHOICES}")
  prefix, container = locate_checkpoint(path)
  reader = tf.train.load_checkpoint(prefix)
  shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
  dtypes = reader.get_variable_to_dtype_map()
  if OBJECT_GRAPH_KEY in shapes:
    paths, skipped = _tf2_model_paths(reader, sorted(shapes), variables)
    if not paths:
      roots = sorted({key.split("/", 1)[0] for key in shapes})
      raise ConversionError(f"{prefix}: no variables under {variables}/ (top level: {roots})")
    layout = names.parse_tf2(paths, variables, skipped)
    naming = "tf2"
  else:
    layout = names.parse_tf1(shapes, variables)
    naming = "tf1"
  logging.info("Read %s (%s_%s): %d tensors", prefix, naming, container, len(shapes))
  return Source(prefix, f"{naming}_{container}", shapes, dtypes, layout, reader)


def _infer_backbone(
  layout: names.SourceLayout, depth: int | None, sk_ratio: float | None
) -> tuple[int, bool, str]:
  """(depth, selective kernels, note) from the numbers of convolutions and BatchNorms."""
  found = (len(layout.backbone_convs), len(layout.backbone_bns))
  counts = names.backbone_counts()
  exact = [arch for arch, count in counts.items() if count == found]
  what = f"{found[0]} convolutions and {found[1]} BatchNorms"
  if exact:
    inferred_depth, sk = exact[0]
    if depth is not None and depth != inferred_depth:
      raise ConversionError(f"--depth={depth}, but the checkpoint holds a ResNet-{inferred_depth}")
    if sk_ratio is not None and (sk_ratio > 0) != sk:
      raise ConversionError(
        f"--sk_ratio={sk_ratio}, but the checkpoint's ResNet-{inferred_depth} has "
        f"{'' if sk else 'no '}selective kernels ({what})"
      )
    return inferred_depth, sk, ""
  allowed = [
    arch
    for arch in counts
    if (depth is None or arch[0] == depth) and (sk_ratio is None or arch[1] == (sk_ratio > 0))
  ]
  if not allowed:
    raise ConversionError(f"--depth={depth} not in {sorted(resnet.RESNET_LAYERS)}")
  distance = lambda a: abs(counts[a][0] - found[0]) + abs(counts[a][1] - found[1])  # noqa: E731
  best = min(allowed, key=distance)
  note = (
    f"The backbone has {what}, which fits no SimCLR ResNet; the closest is ResNet-{best[0]} "
    f"{'with' if best[1] else 'without'} selective kernels ({counts[best][0]} and "
    f"{counts[best][1]})."
  )
  return best[0], best[1], note


def _infer_sk_ratio(
  pairs: Mapping[TargetPath, str], shapes: Mapping[str, tuple[int, ...]], flag: float | None
) -> float:
  """The SK ratio that gives every fc conv its width: max(int(filters * ratio), 32)."""
  dims = sorted(
    {
      shapes[key][-2:]
      for target, key in pairs.items()
      if target[-2:] == ("fc_conv", "kernel") and len(shapes.get(key, ())) == 4
    }
  )
  fits = lambda r: all(max(int(f * r), resnet.SK_MIN_DIM) == mid for f, mid in dims)  # noqa: E731
  if flag is not None:
    if not fits(flag):
      raise ConversionError(f"--sk_ratio={flag} does not give the fc widths (filters, mid) {dims}")
    return flag
  for ratio in [DEFAULT_SK_RATIO, *sorted({mid / f for f, mid in dims if mid > resnet.SK_MIN_DIM})]:
    if fits(ratio):
      return ratio
  raise ConversionError(f"No sk_ratio gives the fc widths (filters, mid) {dims}")


def infer_architecture(
  source: Source,
  depth: int | None = None,
  width: float | None = None,
  sk_ratio: float | None = None,
) -> tuple[Architecture, dict[TargetPath, str], str]:
  """(architecture, target leaf -> source key, note) inferred from tensors; flags are checked."""
  layout, shapes = source.layout, source.shapes
  depth, sk, note = _infer_backbone(layout, depth, sk_ratio)
  if sk and source.format.startswith("tf1") and resnet.RESNET_LAYERS[depth][0] == "basic":
    raise ConversionError(
      "TF1 SimCLR's basic blocks with selective kernels feed the avg-pooled input to the main "
      "path as well; our model does not, so this checkpoint cannot be converted faithfully"
    )
  pairs = names.pair_tensors(layout, depth, sk)
  first = shapes.get(pairs.get(("params", "backbone", "block_group_0_block_0", "conv_0", "kernel")))
  inferred_width = first[-1] / 64 if first else width
  if inferred_width is None:
    raise ConversionError(f"Cannot read the width (no first block conv). {note}")
  if width is not None and not math.isclose(width, inferred_width):
    raise ConversionError(f"--width={width}, but the checkpoint has width {inferred_width}")
  if inferred_width.is_integer():
    inferred_width = int(inferred_width)
  ratio = _infer_sk_ratio(pairs, shapes, sk_ratio) if sk else 0.0
  last_dense = layout.head[-1][0].fields.get("kernel") if layout.head else None
  sup_kernel = layout.supervised.fields.get("kernel") if layout.supervised else None
  arch = Architecture(
    depth=depth,
    width=inferred_width,
    sk_ratio=ratio,
    num_proj_layers=len(layout.head),
    proj_out_dim=shapes[last_dense][-1] if last_dense in shapes else 128,
    num_classes=shapes[sup_kernel][-1] if sup_kernel in shapes else 0,
  )
  return arch, pairs, note


def target_shapes(arch: Architecture) -> dict[TargetPath, tuple[int, ...]]:
  """Every leaf of our model's {'params', 'batch_stats'} and its shape (nothing is computed)."""
  model = resnet.create_model(arch.spec())
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )
  flat = traverse_util.flatten_dict(dict(variables))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_pairs(
  source: Source, pairs: Mapping[TargetPath, str], targets: Mapping[TargetPath, tuple[int, ...]]
) -> list[str]:
  """All mismatches: targets without source, sources without target, wrong shapes or dtypes."""
  problems = []
  for target, shape in sorted(targets.items()):
    key, name = pairs.get(target), "/".join(target)
    if key is None:
      problems.append(f"missing: no source tensor for {name} {list(shape)}")
    elif key not in source.shapes:
      problems.append(f"missing: {key} (for {name} {list(shape)})")
    elif source.shapes[key] != shape:
      problems.append(
        f"wrong shape: {key} {list(source.shapes[key])} -> {name} expects {list(shape)}"
      )
    elif not source.dtypes[key].is_floating:
      problems.append(f"wrong dtype: {key} is {source.dtypes[key].name} (for {name})")
  used = collections.Counter(key for target, key in pairs.items() if target in targets)
  model_keys = set(source.shapes) - set(source.layout.skipped)
  unknown = set(source.layout.extra)
  for key in sorted(model_keys - set(used)):
    why = "matches no SimCLR layer name" if key in unknown else "has no place in the model"
    problems.append(f"extra: {key} {list(source.shapes[key])} {why}")
  problems += [f"used twice: {key}" for key, count in sorted(used.items()) if count > 1]
  return problems


def _report(source: Source, arch: Architecture, checkpoint: str, variables: str, used: int) -> dict:
  skipped = collections.Counter(source.layout.skipped.values())
  model = {
    "depth": arch.depth,
    "width": arch.width,
    "sk_ratio": arch.sk_ratio,
    "stem": "imagenet",
    "num_proj_layers": arch.num_proj_layers,
    "proj_out_dim": arch.proj_out_dim,
  }
  return {
    "checkpoint": checkpoint,
    "prefix": source.prefix,
    "format": source.format,
    "variables": variables,
    **dataclasses.asdict(arch),
    "tensors": {
      "total": len(source.shapes),
      "used": used,
      "skipped": sum(skipped.values()),
      "skipped_by_rule": dict(sorted(skipped.items())),
    },
    "model": model,
    "notes": [
      "Set the `model` keys in your config; inputs are RGB in [0, 1] without normalisation.",
      f"num_classes={arch.num_classes} is the source's supervised head (0 = none); it loads "
      "only into a model with the same model.num_classes.",
      "supervised_input_layer (SimCLR's ft_proj_selector) is not stored in the weights.",
    ],
  }


def convert(
  checkpoint: str,
  out: str,
  *,
  depth: int | None = None,
  width: float | None = None,
  sk_ratio: float | None = None,
  variables: str = "model",
) -> dict[str, Any]:
  """Converts `checkpoint` into a weights-only Orbax checkpoint in `out`; returns the report.

  Raises:
    ConversionError: the tensors do not fit a SimCLR ResNet (every mismatch is listed), or a
      flag contradicts what the checkpoint holds.
  """
  out_dir = epath.Path(out)
  if (out_dir / checkpoint_lib.CHECKPOINT_DIR).exists():
    raise FileExistsError(f"--out={out} already holds a checkpoint; choose a new directory")
  source = read_checkpoint(checkpoint, variables)
  arch, pairs, note = infer_architecture(source, depth, width, sk_ratio)
  targets = target_shapes(arch)
  problems = check_pairs(source, pairs, targets)
  if problems:
    header = f"{source.prefix} ({source.format}) does not fit {arch}. {note}".strip()
    raise ConversionError("\n  ".join([f"{header}\n{len(problems)} problems:", *problems]))
  flat = {t: np.asarray(source.reader.get_tensor(pairs[t]), np.float32) for t in targets}
  tree = traverse_util.unflatten_dict(flat)
  checkpoint_lib.save_weights(out_dir, tree["params"], tree.get("batch_stats", {}))
  report = _report(source, arch, checkpoint, variables, len(flat))
  (out_dir / run_files.CONVERSION_FILE).write_text(json.dumps(report, indent=2) + "\n")
  logging.info("Wrote %s: %s", out_dir, json.dumps(report["model"]))
  return report


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "TF1/TF2 checkpoint prefix or dir, or a SavedModel dir.")
  flags.DEFINE_string("out", None, "New directory for the Orbax checkpoint and conversion.json.")
  flags.DEFINE_integer("depth", None, "Expected ResNet depth (checked; inferred if unset).")
  flags.DEFINE_float("width", None, "Expected width multiplier (checked; inferred if unset).")
  flags.DEFINE_float("sk_ratio", None, "Expected selective-kernel ratio, 0 = none (checked).")
  flags.DEFINE_enum("variables", "model", list(names.VARIABLE_CHOICES), "Which weight copy.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main() -> None:
  tf.config.set_visible_devices([], "GPU")
  values = flags.FLAGS
  report = convert(
    values.checkpoint,
    values.out,
    depth=values.depth,
    width=values.width,
    sk_ratio=values.sk_ratio,
    variables=values.variables,
  )
  print(json.dumps({"model": report["model"], "num_classes": report["num_classes"]}))


if __name__ == "__main__":
  app.run(main, define_flags)

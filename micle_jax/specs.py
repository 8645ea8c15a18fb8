"""The config schema: one typed, validated spec per config section, built by `from_config`.

Configs are `ml_collections.ConfigDict`s (see `configs/`); this module says what they may hold.
`from_config(PretrainSpec, config)` or `from_config(FinetuneSpec, config)` builds the whole tree
before any work and fails naming the key: an unknown key (`config.model.widht`), a value of the
wrong type, or a value out of range (`config.model.depth=42 not in [18, 34, ...]`).

The schema owns the vocabularies a config may use (methods, depths, tasks, presets, ...); the
modules that implement them check at import that they provide exactly these (e.g.
`data.tasks`, `data.augment_presets`, `models.resnet`). Nothing here imports TensorFlow, JAX or
flags, so every layer of the package may use the specs.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

METHODS = ("simclr", "micle")
VIEWS = ("all", "frontal", "ap", "pa")
# Label tasks (implemented by `data.tasks`): how a dataset's labels become targets.
TASKS = ("none", "multiclass", "chexpert", "nih")
# The supervised loss a task trains with (`train.steps`): none, softmax or sigmoid per label.
LABEL_LOSSES = ("none", "multiclass", "multilabel")
LABEL_SETS = ("competition5", "all14")
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
# View recipes (implemented by `data.augment_presets`).
PRESETS = ("simclr", "cxr", "cxr_small", "derm", "derm_small")
DEPTHS = (18, 34, 50, 101, 152, 200)
STEMS = ("imagenet", "cifar")
# How the ResNet computes where SimCLR's and torchvision's differ (`models.resnet.ResNet`).
VARIANTS = ("simclr", "torchvision")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
MODES = ("full", "linear")
# What an evaluation scores: multi-label "image" or "study"; multi-class "case" or "image".
AGGREGATIONS = ("image", "study", "case")


class ConfigError(ValueError):
  """A config key that is unknown, of the wrong type, or out of range (the message names it)."""


def _one_of(key: str, value: Any, allowed: tuple) -> None:
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} not in {list(allowed)}")


def _positive(key: str, value: float, *, strict: bool = True) -> None:
  if value <= 0 if strict else value < 0:
    raise ConfigError(f"config.{key}={value} must be {'>' if strict else '>='} 0")


def _check_dataset(spec) -> None:
  if not spec.name:
    raise ConfigError("config.dataset.name is empty")
  _one_of("dataset.views", spec.views, VIEWS)
  _positive("dataset.shuffle_buffer", spec.shuffle_buffer)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """`dataset` of a pretraining config: which prepared TFDS split to read, and which views."""

  name: str = ""
  split: str = "train"
  data_dir: str = ""  # "" = the TFDS default
  shuffle_buffer: int = 10_000
  views: str = "all"

  def __post_init__(self):
    _check_dataset(self)


@dataclasses.dataclass(frozen=True)
class FinetuneDatasetSpec:
  """`dataset` of a fine-tuning config: the labelled training split and the evaluation split."""

  name: str = ""
  train_split: str = "train"
  eval_split: str = "validation"
  data_dir: str = ""
  shuffle_buffer: int = 10_000
  views: str = "all"

  def __post_init__(self):
    _check_dataset(self)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """`augment`: the view recipe (`data.augment_presets`) and the side of a view in pixels."""

  preset: str = "simclr"
  image_size: int = 224

  def __post_init__(self):
    _one_of("augment.preset", self.preset, PRESETS)
    if self.image_size < 8:
      raise ConfigError(f"config.augment.image_size={self.image_size} must be >= 8")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """`labels`: how labels are read (`data.tasks`), the same section in every config.

  Pretraining reads them only for the supervised monitor ("none": no monitor); fine-tuning
  trains on them. `label_set` and `uncertainty_policy` apply to CheXpert's raw observations:
  the policy is "ones", "zeros", "ignore", or a {condition: policy} dict.
  """

  task: str = "none"
  label_set: str = "competition5"
  uncertainty_policy: Any = "ones"

  def __post_init__(self):
    _one_of("labels.task", self.task, TASKS)
    _one_of("labels.label_set", self.label_set, LABEL_SETS)
    policy = self.uncertainty_policy
    if isinstance(policy, Mapping):
      object.__setattr__(self, "uncertainty_policy", dict(policy))
      for condition, value in policy.items():
        _one_of(f"labels.uncertainty_policy[{condition!r}]", value, UNCERTAINTY_POLICIES)
    else:
      _one_of("labels.uncertainty_policy", policy, UNCERTAINTY_POLICIES)


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
  """`probe`: the kNN probe of pretraining (`eval.probe`). `dataset` "" switches it off;
  `data_dir` "" reads beside the pretraining dataset."""

  dataset: str = ""
  split: str = "train"
  data_dir: str = ""
  task: str = "chexpert"
  views: str = "all"
  max_images: int = 512
  k: int = 20
  batch_size: int = 128

  def __post_init__(self):
    _one_of("probe.task", self.task, tuple(t for t in TASKS if t != "none"))
    _one_of("probe.views", self.views, VIEWS)
    for key in ("max_images", "k", "batch_size"):
      _positive(f"probe.{key}", getattr(self, key))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """`model`: the SimCLR ResNet and its heads (`models.resnet.create_model`).

  `num_classes`, `stop_gradient_supervised` and `freeze_backbone` are not config keys: the
  driver sets them (from the dataset, and the fine-tuning mode).
  """

  depth: int = 50
  width: float = 1.0
  sk_ratio: float = 0.0
  stem: str = "imagenet"
  # "simclr": SimCLR's ResNet; "torchvision": computes as torchvision's (for imported weights)
  variant: str = "simclr"
  dtype: str = "float32"
  num_proj_layers: int = 3
  proj_out_dim: int = 128
  supervised_input_layer: int = 0
  proj_layers_kept: int = -1  # -1: all num_proj_layers; fine-tuning keeps this many
  zero_init_head: bool = False
  num_classes: int = 0
  stop_gradient_supervised: bool = True
  freeze_backbone: bool = False

  def __post_init__(self):
    _one_of("model.depth", self.depth, DEPTHS)
    _one_of("model.stem", self.stem, STEMS)
    _one_of("model.variant", self.variant, VARIANTS)
    if self.variant == "torchvision" and (self.stem != "imagenet" or self.sk_ratio > 0):
      raise ConfigError(
        f"config.model.variant='torchvision' needs stem='imagenet' and sk_ratio=0 (torchvision's "
        f"ResNet); got stem={self.stem!r}, sk_ratio={self.sk_ratio}"
      )
    _one_of("model.dtype", self.dtype, DTYPES)
    _positive("model.width", self.width)
    _positive("model.sk_ratio", self.sk_ratio, strict=False)
    _positive("model.proj_out_dim", self.proj_out_dim)
    _positive("model.num_proj_layers", self.num_proj_layers, strict=False)
    built = self.num_proj_layers if self.proj_layers_kept < 0 else self.proj_layers_kept
    if built > self.num_proj_layers:
      raise ConfigError(
        f"config.model.proj_layers_kept={self.proj_layers_kept} exceeds num_proj_layers="
        f"{self.num_proj_layers}"
      )
    if not 0 <= self.supervised_input_layer <= built:
      raise ConfigError(
        f"config.model.supervised_input_layer={self.supervised_input_layer} must be in "
        f"[0, {built}] (the projection-head layers built)"
      )


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """`optimizer` (`train.optim`).

  Attributes:
    name: "lars" (pretraining), "sgd" (momentum SGD) or "adamw".
    base_learning_rate: lr before batch scaling (SimCLR: 0.3 linear, 0.075 sqrt).
    lr_scaling: "linear" (base·B/256), "sqrt" (base·√B) or "none" (base).
    weight_decay: decay on kernels (SimCLRv2: 1e-6).
    momentum: LARS/SGD momentum (adamw: b1).
    trust_coefficient: LARS η.
    warmup_epochs: linear warm-up length, converted to steps by the caller.
    b2: AdamW second-moment decay.
  """

  name: str = "lars"
  base_learning_rate: float = 0.3
  lr_scaling: str = "linear"
  weight_decay: float = 1e-6
  momentum: float = 0.9
  trust_coefficient: float = 0.001
  warmup_epochs: float = 10.0
  b2: float = 0.999

  def __post_init__(self):
    _one_of("optimizer.name", self.name, OPTIMIZERS)
    _one_of("optimizer.lr_scaling", self.lr_scaling, LR_SCALINGS)
    for key in ("base_learning_rate", "weight_decay", "warmup_epochs"):
      _positive(f"optimizer.{key}", getattr(self, key), strict=False)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """The step loop's keys (top level in a config): logging, checkpoints, time boxes, profiles."""

  log_every_steps: int = 50
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 3
  max_steps_per_run: int = -1  # > 0: save and stop after this many steps (time-boxed jobs)
  profile_steps: int = 0  # > 0: capture a profile of this many steps after the first log

  def __post_init__(self):
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
      _positive(key, getattr(self, key))


@dataclasses.dataclass(frozen=True)
class ShiftSpec:
  """One entry of `shift`: a zero-shot evaluation set under distribution shift."""

  name: str = ""
  split: str = "test"
  data_dir: str = ""
  task: str = "chexpert"
  views: str = "all"


def _flat(**kwargs) -> Any:
  """Marks a field whose keys sit at the top level of the config, not in a section."""
  return dataclasses.field(metadata={"flat": True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
  """A pretraining config (`configs/cxr.py`, `derm.py`, `imagenet.py`; `pretrain.py`)."""

  seed: int = 0
  method: str = "micle"
  temperature: float = 0.1
  batch_size: int = 1024  # global, over all devices and hosts
  num_epochs: int = 100  # passes over the split's *images*, whatever the method
  num_steps: int = -1  # > 0 overrides num_epochs
  init_from: str = ""
  init_projection_head: bool = True
  dataset: DatasetSpec = dataclasses.field(default_factory=DatasetSpec)
  augment: AugmentSpec = dataclasses.field(default_factory=AugmentSpec)
  labels: LabelSpec = dataclasses.field(default_factory=LabelSpec)
  probe: ProbeSpec = dataclasses.field(default_factory=ProbeSpec)
  model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
  loop: LoopSpec = _flat(default_factory=LoopSpec)

  def __post_init__(self):
    _one_of("method", self.method, METHODS)
    _positive("temperature", self.temperature)
    _positive("batch_size", self.batch_size)
    if self.num_steps <= 0 and self.num_epochs <= 0:
      raise ConfigError("config.num_steps or config.num_epochs must be > 0")


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """A fine-tuning config (`configs/finetune_*.py`; `finetune.py`)."""

  seed: int = 0  # also picks the label-fraction subset and the bootstrap resamples
  init_from: str = ""
  init_step: int = -1  # -1: init_from's latest step, which must finish its pretraining
  init_seed: int = -1  # the random initialisation's seed; -1: `seed`
  mode: str = "full"
  label_fraction: float = 1.0
  batch_size: int = 256
  eval_batch_size: int = 256
  num_epochs: int = 30
  num_steps: int = -1
  eval_aggregation: str = "image"
  bootstrap_samples: int = 1000
  dataset: FinetuneDatasetSpec = dataclasses.field(default_factory=FinetuneDatasetSpec)
  labels: LabelSpec = dataclasses.field(default_factory=LabelSpec)
  augment: AugmentSpec = dataclasses.field(default_factory=AugmentSpec)
  model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
  shift: dict[str, ShiftSpec] = dataclasses.field(default_factory=dict)
  loop: LoopSpec = _flat(default_factory=LoopSpec)

  def __post_init__(self):
    _one_of("mode", self.mode, MODES)
    if not 0.0 < self.label_fraction <= 1.0:
      raise ConfigError(f"config.label_fraction={self.label_fraction} must be in (0, 1]")
    for key in ("batch_size", "eval_batch_size", "bootstrap_samples"):
      _positive(key, getattr(self, key))
    if self.num_steps <= 0 and self.num_epochs <= 0:
      raise ConfigError("config.num_steps or config.num_epochs must be > 0")
    if self.init_step < -1:
      raise ConfigError(f"config.init_step={self.init_step}: a step >= 0, or -1 for the latest")
    if self.model.proj_layers_kept < 0:
      raise ConfigError(
        f"config.model.proj_layers_kept={self.model.proj_layers_kept}: fine-tuning needs the "
        f"number of projection-head layers to keep and restore, 0 to {self.model.num_proj_layers}"
      )
    _one_of("eval_aggregation", self.eval_aggregation, AGGREGATIONS)
    if self.labels.task == "none":
      raise ConfigError("config.labels.task='none': fine-tuning needs labels")
    for key, shift in self.shift.items():
      _one_of(f"shift.{key}.task", shift.task, TASKS[1:])
      _one_of(f"shift.{key}.views", shift.views, VIEWS)
      if not shift.name:
        raise ConfigError(f"config.shift.{key}.name is empty")


T = typing.TypeVar("T")


def _check_type(key: str, value: Any, hint: Any) -> Any:
  """`value` if it has the type of `hint` (an int is a float; `Any` takes anything)."""
  if hint is Any:
    return value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint in (int, float) and isinstance(value, bool):
    raise ConfigError(f"config.{key}={value!r}: expected {hint.__name__}, got bool")
  if isinstance(hint, type) and not isinstance(value, hint):
    raise ConfigError(
      f"config.{key}={value!r}: expected {hint.__name__}, got {type(value).__name__}"
    )
  return value


def _as_mapping(key: str, section: Any) -> Mapping[str, Any]:
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return section
  raise ConfigError(f"config.{key} must be a section (a ConfigDict), got {section!r}")


def _build(cls: type[T], values: Mapping[str, Any], prefix: str) -> tuple[T, set[str]]:
  """(spec, keys of `values` it used); nested specs read their own section."""
  hints = typing.get_type_hints(cls)
  kwargs, used = {}, set()
  for field in dataclasses.fields(cls):
    if not field.init or field.name in _DRIVER_SET.get(cls, ()):
      continue
    hint, key = hints[field.name], f"{prefix}{field.name}"
    if field.metadata.get("flat"):
      kwargs[field.name], flat_used = _build(hint, values, prefix)
      used |= flat_used
      continue
    if field.name not in values:
      continue
    used.add(field.name)
    value = values[field.name]
    if dataclasses.is_dataclass(hint):
      kwargs[field.name] = from_config(hint, value, key)
    elif typing.get_origin(hint) is dict:
      entry = typing.get_args(hint)[1]
      kwargs[field.name] = {
        name: from_config(entry, item, f"{key}.{name}")
        for name, item in _as_mapping(key, value).items()
      }
    elif isinstance(hint, types.UnionType):
      kwargs[field.name] = value
    else:
      kwargs[field.name] = _check_type(key, value, hint)
  return cls(**kwargs), used


def _refuse_unknown(cls: type, values: Mapping[str, Any], used: set[str], key: str) -> None:
  unknown = sorted(set(values) - used)
  if unknown:
    valid = sorted(_config_keys(cls))
    where = f"config.{key}" if key else "config"
    raise ConfigError(f"{where} has unknown keys {unknown}; valid: {valid}")


def _config_keys(cls: type) -> set[str]:
  hints = typing.get_type_hints(cls)
  keys = set()
  for field in dataclasses.fields(cls):
    if field.metadata.get("flat"):
      keys |= _config_keys(hints[field.name])
    elif field.name not in _DRIVER_SET.get(cls, ()):
      keys.add(field.name)
  return keys


# Fields that drivers set, not configs.
_DRIVER_SET = {ModelSpec: ("num_classes", "stop_gradient_supervised", "freeze_backbone")}


def from_config(cls: type[T], config: Any, key: str = "") -> T:
  """The validated spec of a whole config (`PretrainSpec`, `FinetuneSpec`), or of the section
  `key` of one (`from_config(LabelSpec, config.labels, "labels")`).

  Raises:
    ConfigError: naming the first unknown key, badly typed value or value out of range.
  """
  values = _as_mapping(key, config)
  try:
    spec, used = _build(cls, values, f"{key}." if key else "")
  except TypeError as e:  # a dataclass refusing a value of the wrong shape
    raise ConfigError(f"config{'.' + key if key else ''}: {e}") from e
  _refuse_unknown(cls, values, used, key)
  return spec

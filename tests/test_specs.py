"""The config schema: every config validates, and every kind of bad key is named before any work."""

import dataclasses

import ml_collections
import pytest

from configs import cxr, derm, finetune_cxr, finetune_derm, imagenet
from micle_jax import finetune, specs
from micle_jax.data import augment_presets, tasks, views
from micle_jax.models import resnet


@pytest.mark.parametrize(
  "module, arg",
  [(cxr, None), (cxr, "demo"), (cxr, "sk,views=frontal"), (derm, "demo"), (imagenet, None)],
)
def test_every_pretraining_config_validates(module, arg):
  config = module.get_config(arg)
  spec = specs.from_config(specs.PretrainSpec, config)
  assert spec.model.depth == config.model.depth and spec.labels.task == config.labels.task
  assert spec.loop.log_every_steps == config.log_every_steps  # the loop's keys sit at the top


@pytest.mark.parametrize(
  "module, arg", [(finetune_cxr, None), (finetune_cxr, "demo,linear"), (finetune_derm, "demo")]
)
def test_every_finetuning_config_validates(module, arg):
  config = module.get_config(arg)
  spec = finetune.validate(config)
  assert spec.labels.task == config.labels.task
  assert set(spec.shift) == set(config.shift) and all(
    isinstance(s, specs.ShiftSpec) for s in spec.shift.values()
  )


def _changed(config: ml_collections.ConfigDict, changes: dict) -> dict:
  """`config` as a plain dict with `changes` ("section.key": value), wrong types included."""
  values = config.to_dict()
  for key, value in changes.items():
    *sections, name = key.split(".")
    target = values
    for section in sections:
      target = target[section]
    target[name] = value
  return values


def _pretrain(**changes) -> dict:
  return _changed(cxr.get_config("demo"), changes)


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"learning_rate": 0.1}, r"config has unknown keys \['learning_rate'\]"),
    ({"model.widht": 2.0}, r"config.model has unknown keys \['widht'\]; valid: .*'width'"),
    ({"probe.neighbours": 3}, r"config.probe has unknown keys \['neighbours'\]"),
    ({"model.num_classes": 3}, r"config.model has unknown keys \['num_classes'\]"),
    ({"model.depth": 42}, r"config.model.depth=42 not in \[18, 34, 50, 101, 152, 200\]"),
    ({"model.depth": "50"}, r"config.model.depth='50': expected int, got str"),
    ({"model.width": True}, r"config.model.width=True: expected float, got bool"),
    ({"batch_size": 0}, r"config.batch_size=0 must be > 0"),
    ({"method": "byol"}, r"config.method='byol' not in \['simclr', 'micle'\]"),
    ({"dataset.views": "oblique"}, r"config.dataset.views='oblique' not in"),
    ({"dataset.name": ""}, r"config.dataset.name is empty"),
    ({"augment.preset": "mri"}, r"config.augment.preset='mri' not in"),
    ({"augment.image_size": 4}, r"config.augment.image_size=4 must be >= 8"),
    ({"labels.task": "regression"}, r"config.labels.task='regression' not in"),
    ({"labels.uncertainty_policy": "maybe"}, r"config.labels.uncertainty_policy='maybe' not in"),
    ({"optimizer.lr_scaling": "cubic"}, r"config.optimizer.lr_scaling='cubic' not in"),
    ({"log_every_steps": 0}, r"config.log_every_steps=0 must be > 0"),
    ({"model.supervised_input_layer": 5}, r"config.model.supervised_input_layer=5 must be in"),
    ({"num_steps": -1, "num_epochs": 0}, r"config.num_steps or config.num_epochs must be > 0"),
    ({"probe": 3}, r"config.probe must be a section"),
  ],
)
def test_a_bad_pretraining_config_is_named(changes, message):
  with pytest.raises(specs.ConfigError, match=message):
    specs.from_config(specs.PretrainSpec, _pretrain(**changes))


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"task": "chexpert"}, r"config has unknown keys \['task'\]"),  # now labels.task
    ({"labels.task": "none"}, r"fine-tuning needs labels"),
    ({"mode": "probe"}, r"config.mode='probe' not in"),
    ({"label_fraction": 0.0}, r"config.label_fraction=0.0 must be in \(0, 1\]"),
    ({"shift.nih.task": "mri"}, r"config.shift.nih.task='mri' not in"),
    ({"shift.nih.weight": 1.0}, r"config.shift.nih has unknown keys \['weight'\]"),
    ({"shift.nih.task": "multiclass"}, r"shift.nih.task='multiclass' is multiclass; .*multilabel"),
    ({"eval_aggregation": "case"}, r"config.eval_aggregation='case' not in"),
    (
      {"labels.uncertainty_policy": {"Edema": "ones"}},
      r"policy dict has no entry for condition\(s\) \['Atelectasis'",
    ),
  ],
)
def test_a_bad_finetuning_config_is_named(changes, message):
  config = ml_collections.ConfigDict(_changed(finetune_cxr.get_config("demo"), changes))
  with pytest.raises(ValueError, match=message):
    finetune.validate(config)


def test_specs_hold_the_config_values_and_their_defaults():
  spec = specs.from_config(specs.PretrainSpec, _pretrain(**{"optimizer.base_learning_rate": 2}))
  assert spec.optimizer.base_learning_rate == 2.0 and isinstance(
    spec.optimizer.base_learning_rate, float
  )
  assert specs.from_config(specs.PretrainSpec, {"dataset": {"name": "x"}}) == specs.PretrainSpec(
    dataset=specs.DatasetSpec(name="x")
  )
  policy = {"Atelectasis": "ones", "Edema": "zeros"}
  labels = specs.from_config(specs.LabelSpec, {"uncertainty_policy": policy}, "labels")
  assert labels.uncertainty_policy == policy
  with pytest.raises(specs.ConfigError, match=r"config.labels has unknown keys \['tsak'\]"):
    specs.from_config(specs.LabelSpec, {"tsak": "nih"}, "labels")
  model = dataclasses.replace(
    specs.from_config(specs.ModelSpec, {"depth": 18}, "model"), num_classes=3
  )
  assert (model.depth, model.num_classes) == (18, 3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    model.depth = 50


def test_the_implementations_provide_exactly_the_schemas_vocabularies():
  assert tuple(tasks.REGISTRY) == specs.TASKS
  assert set(augment_presets.PRESETS) == set(specs.PRESETS)
  assert tuple(resnet.RESNET_LAYERS) == specs.DEPTHS
  assert views.VIEWS == specs.VIEWS

"""One build for every driver: model, schedule, initial state and the jitted step of a run.

Pretraining, fine-tuning, the benchmark, prediction and the tests construct a run here, so
none of them can drift from another (a benchmark that times a different step than training
runs measures nothing).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import optax
from jax.sharding import Mesh

from micle_jax import specs
from micle_jax.models import resnet
from micle_jax.train import optim, steps, train_state

KINDS = ("pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run trains, and how long: everything `build` needs besides the mesh.

  Attributes:
    kind: "pretrain" (contrastive step, the supervised head trust-scaled as SimCLR's monitor) or
      "finetune" (supervised step; the head as in SimCLR's fine-tuning, no trust ratio).
    model: the model section, with the fields the driver sets (classes, frozen backbone).
    optimizer: the optimizer section.
    batch_size: the global batch (learning-rate scaling).
    total_steps: the schedule's length.
    steps_per_epoch: converts `optimizer.warmup_epochs` to steps.
    image_size: side of an input view.
    seed: parameter initialisation.
    label_loss: the supervised loss (`data.tasks`' loss of the task), "none" for no head.
    temperature: NT-Xent temperature (pretraining).
    linear: fine-tuning only: train the supervised head alone (the rest is frozen).
  """

  kind: str
  model: specs.ModelSpec
  optimizer: specs.OptimizerSpec
  batch_size: int
  total_steps: int
  steps_per_epoch: float
  image_size: int
  seed: int
  label_loss: str = "none"
  temperature: float = 0.1
  linear: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} not in {KINDS}")
    if self.label_loss not in steps.LABEL_LOSSES:
      raise ValueError(f"label_loss={self.label_loss!r} not in {steps.LABEL_LOSSES}")


class Built(NamedTuple):
  """A run, ready to step: `state, metrics = step_fn(state, global_batch)`."""

  model: resnet.ContrastiveModel
  schedule: optax.Schedule
  state: train_state.TrainState
  step_fn: Callable[[Any, Any], tuple[Any, dict[str, Any]]]


def optimizer(plan: Plan, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The plan's optimizer; in linear fine-tuning only the supervised head moves."""
  tx = optim.create_optimizer(
    plan.optimizer, learning_rate=schedule, trust_scale_head=plan.kind == "pretrain"
  )
  if not plan.linear:
    return tx
  return optax.multi_transform(
    {"train": tx, "freeze": optax.set_to_zero()},
    lambda params: {k: "train" if k == optim.SUPERVISED_HEAD else "freeze" for k in params},
  )


def build(plan: Plan, mesh: Mesh) -> Built:
  """The model, schedule, replicated initial state (from `plan.seed`) and jitted step of `plan`."""
  model = resnet.create_model(plan.model)
  schedule = optim.create_schedule(
    plan.optimizer,
    batch_size=plan.batch_size,
    total_steps=plan.total_steps,
    steps_per_epoch=plan.steps_per_epoch,
  )
  size = plan.image_size
  state = train_state.create_train_state(
    model, optimizer(plan, schedule), seed=plan.seed, image_shape=(size, size, 3), mesh=mesh
  )
  if plan.kind == "pretrain":
    step_fn = steps.compile_pretrain_step(
      mesh,
      temperature=plan.temperature,
      label_loss=plan.label_loss,
      learning_rate_fn=schedule,
    )
  else:
    step_fn = steps.compile_finetune_step(
      mesh, label_loss=plan.label_loss, learning_rate_fn=schedule
    )
  return Built(model, schedule, state, step_fn)

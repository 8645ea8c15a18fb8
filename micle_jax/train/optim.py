"""Optimizers and learning-rate schedules, built from a plain spec with optax (no hand-written maths).

Pretraining uses LARS as in SimCLR (`tf2/lars_optimizer.py`): weight decay is added to the gradient first,
then the trust ratio η‖w‖/‖g‖, then momentum on lr·trust·g — exactly `optax.lars`. BatchNorm
parameters and biases are excluded from both the decay and the trust ratio.

The supervised head follows two rules (`create_optimizer(..., trust_scale_head=...)`):

- Fine-tuning follows SimCLR (`tf2/model.py`, `build_optimizer` + `add_weight_decay`): the head is
  excluded from LARS's trust ratio, so it gets plain momentum updates at the full learning rate,
  and its kernel's weight decay is a plain L2 term on the gradient (SimCLR adds it back as a
  loss; that is what decaying it before momentum does).
- Pretraining's linear monitor deliberately deviates: there its kernel is trust-scaled like every
  other kernel. With SimCLR's rule the monitor diverged in our CPU demo whenever
  lr · ‖features‖² was large (its loss grew without bound while the contrastive loss fell). Its
  input is a stop-gradient, so this changes only the monitor, and fine-tuning never restores it.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from micle_jax import specs

SUPERVISED_HEAD = "head_supervised"


def scaled_learning_rate(base: float, batch_size: int, scaling: str) -> float:
  """SimCLR's peak learning rate for a global batch size."""
  if scaling == "linear":
    return base * batch_size / 256.0
  if scaling == "sqrt":
    return base * math.sqrt(batch_size)
  if scaling == "none":
    return base
  raise ValueError(f"optimizer.lr_scaling={scaling!r} not in {specs.LR_SCALINGS}")


def warmup_cosine_schedule(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be > 0")
  warmup_steps = min(max(warmup_steps, 0), total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=0.0,
  )


def _path_names(path: tuple[Any, ...]) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_decayed(path: tuple[Any, ...], _: Any = None) -> bool:
  """Kernels (conv and dense) are decayed; BatchNorm scales/biases and dense biases are not."""
  return _path_names(path)[-1] == "kernel"


def is_trust_scaled(path: tuple[Any, ...], _: Any = None, *, head: bool = True) -> bool:
  """Kernels get LARS's trust ratio; the supervised head's only when `head` (see the module doc)."""
  names = _path_names(path)
  return names[-1] == "kernel" and (head or SUPERVISED_HEAD not in names)


def lars_masks(params: Any, *, trust_scale_head: bool = True) -> tuple[Any, Any]:
  """(weight-decay mask, trust-ratio mask) pytrees of booleans shaped like `params`."""
  return _decay_mask(params), _trust_mask(params, head=trust_scale_head)


def _decay_mask(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def _trust_mask(params: Any, *, head: bool = True) -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: is_trust_scaled(path, leaf, head=head), params
  )


def create_optimizer(
  spec: specs.OptimizerSpec,
  *,
  learning_rate: Callable[[Any], Any] | float,
  trust_scale_head: bool = True,
) -> optax.GradientTransformation:
  """Builds the optimizer of `spec`.

  The weight-decay and trust-ratio masks are functions of the parameters the optimizer meets, so
  one optimizer serves any parameter tree, also a partly masked one (`optax.multi_transform`).

  Args:
    spec: the optimizer's description.
    learning_rate: a schedule or a constant.
    trust_scale_head: LARS only: whether the supervised head gets the trust ratio (pretraining's
      monitor: True; fine-tuning, as SimCLR: False, plain momentum updates). See the module doc.
  """
  decay_mask = _decay_mask
  trust_mask = functools.partial(_trust_mask, head=trust_scale_head)
  if spec.name == "lars":
    return optax.lars(
      learning_rate,
      weight_decay=spec.weight_decay,
      weight_decay_mask=decay_mask,
      trust_coefficient=spec.trust_coefficient,
      eps=0.0,
      trust_ratio_mask=trust_mask,
      momentum=spec.momentum,
    )
  if spec.name == "sgd":
    return optax.chain(
      optax.add_decayed_weights(spec.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=spec.momentum),
    )
  return optax.adamw(
    learning_rate, b1=spec.momentum, b2=spec.b2, weight_decay=spec.weight_decay, mask=decay_mask
  )


def create_schedule(
  spec: specs.OptimizerSpec, *, batch_size: int, total_steps: int, steps_per_epoch: float
) -> optax.Schedule:
  """The learning-rate schedule: scaled peak, `warmup_epochs` of linear warm-up, cosine to 0."""
  peak = scaled_learning_rate(spec.base_learning_rate, batch_size, spec.lr_scaling)
  warmup_steps = int(round(spec.warmup_epochs * steps_per_epoch))
  return warmup_cosine_schedule(peak, total_steps, warmup_steps)

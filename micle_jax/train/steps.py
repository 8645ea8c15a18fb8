"""Pure, jittable contrastive pretraining step, and its compilation with explicit shardings.

Batch layout (global, sharded over `data`): `view1`, `view2` [N, H, W, 3] float in [0, 1] —
row i of view2 is the positive of row i of view1 (two augmentations of one image for SimCLR; two
distinct images of one case for MICLe) — plus optional supervised-monitor labels: `label` [N]
int32 (multi-class) or `targets` / `target_mask` [N, K] float32 (multi-label), and optional
`multi_image` [N] (1.0 where the pair came from two different images), reported as a metric.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from micle_jax import specs
from micle_jax.runtime import sharding
from micle_jax.train import losses
from micle_jax.train.train_state import TrainState

LABEL_LOSSES = specs.LABEL_LOSSES  # the supervised loss (`data.tasks` gives each task's)


def interleave_views(view1: jnp.ndarray, view2: jnp.ndarray) -> jnp.ndarray:
  """[N, ...] × 2 -> [2N, ...] with rows (v1[0], v2[0], v1[1], ...): each shard stays local."""
  return jnp.stack([view1, view2], axis=1).reshape(-1, *view1.shape[1:])


def supervised_loss(
  logits: jnp.ndarray, batch: dict[str, jnp.ndarray], label_loss: str, repeats: int = 1
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Loss and metrics of the supervised head; labels are repeated for interleaved views."""
  if label_loss == "multiclass":
    labels = jnp.repeat(batch["label"], repeats, axis=0)
    loss = losses.softmax_cross_entropy(logits, labels)
    return loss, {"sup_loss": loss, "sup_acc": jnp.mean(jnp.argmax(logits, -1) == labels)}
  if label_loss == "multilabel":
    targets = jnp.repeat(batch["targets"], repeats, axis=0)
    mask = jnp.repeat(batch["target_mask"], repeats, axis=0)
    loss = losses.masked_sigmoid_cross_entropy(logits, targets, mask)
    correct = ((logits > 0) == (targets > 0.5)) * mask
    acc = jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"sup_loss": loss, "sup_acc": acc}
  raise ValueError(f"label_loss={label_loss!r} not in {LABEL_LOSSES}")


def pretrain_step(
  state: TrainState,
  batch: dict[str, jnp.ndarray],
  *,
  temperature: float,
  label_loss: str = "none",
  learning_rate_fn: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One SimCLR/MICLe step: NT-Xent on the projections (+ the stop-gradient supervised monitor).

  Both views go through the network as one batch of 2N, so BatchNorm statistics cover both views
  of the whole global batch, as in SimCLR.

  Returns:
    (new state, metrics) with `loss` (total), `contrast_loss`, the NT-Xent metrics, the
    supervised monitor's `sup_loss` / `sup_acc` when `label_loss` != "none", `multi_image_fraction`
    when the batch reports it, `learning_rate`, `grad_norm`, and `params_finite` (False once an
    update made any parameter non-finite).
  """
  n = batch["view1"].shape[0]
  images = interleave_views(batch["view1"], batch["view2"])

  def loss_fn(params):
    outputs, new_vars = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    z = outputs["projection"].reshape(n, 2, -1)
    contrast_loss, metrics = losses.nt_xent(z[:, 0], z[:, 1], temperature=temperature)
    metrics["contrast_loss"] = contrast_loss
    total = contrast_loss
    if label_loss != "none":
      sup_loss, sup_metrics = supervised_loss(outputs["logits"], batch, label_loss, repeats=2)
      metrics.update(sup_metrics)
      total = total + sup_loss
    metrics["loss"] = total
    return total, (new_vars["batch_stats"], metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["params_finite"] = jnp.isfinite(optax.tree.norm(params))
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  if "multi_image" in batch:
    metrics["multi_image_fraction"] = jnp.mean(batch["multi_image"].astype(jnp.float32))
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, metrics


def compile_pretrain_step(mesh: Mesh, **step_kwargs: Any):
  """`pretrain_step` under `jax.jit`: state replicated and donated, batch sharded over `data`."""
  if step_kwargs.get("label_loss", "none") not in LABEL_LOSSES:
    raise ValueError(f"label_loss={step_kwargs['label_loss']!r} not in {LABEL_LOSSES}")
  return jax.jit(
    functools.partial(pretrain_step, **step_kwargs),
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def finetune_step(
  state: TrainState,
  batch: dict[str, jnp.ndarray],
  *,
  label_loss: str,
  learning_rate_fn: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One supervised step on `batch['image']` [N, H, W, 3] with its labels (`label_loss`)."""

  def loss_fn(params):
    outputs, new_vars = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    loss, metrics = supervised_loss(outputs["logits"], batch, label_loss)
    return loss, (new_vars["batch_stats"], metrics)

  grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["loss"] = metrics["sup_loss"]
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["params_finite"] = jnp.isfinite(optax.tree.norm(params))
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
  )
  return new_state, metrics


def predict_step(state: TrainState, images: jnp.ndarray, *, label_loss: str) -> jnp.ndarray:
  """Class probabilities (softmax for multi-class, sigmoid per label for multi-label)."""
  logits = state.apply_fn(state.variables(), images, train=False)["logits"]
  return jax.nn.softmax(logits) if label_loss == "multiclass" else jax.nn.sigmoid(logits)


def compile_finetune_step(mesh: Mesh, **step_kwargs: Any):
  """`finetune_step` under `jax.jit`: state replicated and donated, batch sharded over `data`."""
  return jax.jit(
    functools.partial(finetune_step, **step_kwargs),
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def compile_predict_step(mesh: Mesh, *, label_loss: str):
  """`predict_step` under `jax.jit`, images sharded over `data`."""
  return jax.jit(
    functools.partial(predict_step, label_loss=label_loss),
    in_shardings=(sharding.replicated(mesh), sharding.data_sharding(mesh)),
    out_shardings=sharding.data_sharding(mesh),
  )

"""The training state: params, BatchNorm statistics, optimizer state and step, in one pytree."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from micle_jax.runtime import sharding


class TrainState(struct.PyTreeNode):
  """Everything a step reads and writes; `apply_fn` and `tx` are static.

  No step draws random numbers (every random choice of a run is the input pipeline's, a
  function of the seed, the epoch and an image id), so the state holds no rng.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int]) -> Any:
  """Initial {'params', 'batch_stats'} of `model` for images of `image_shape` (H, W, C)."""
  dummy = jnp.zeros((2, *image_shape), jnp.float32)
  return model.init({"params": rng}, dummy, train=False)


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  *,
  seed: int,
  image_shape: tuple[int, int, int],
  mesh: Mesh,
) -> TrainState:
  """Initialises a replicated TrainState on `mesh` from `seed` (deterministic).

  Args:
    model: the Flax model.
    tx: the optimizer.
    seed: the config's seed; parameter init derives from it.
    image_shape: (H, W, C) of one input image.
    mesh: the device mesh; the state is replicated over it.
  """
  # The first half of a split, as when the state also carried a step rng: same seed, same init.
  # The key is an argument, not a constant of the compiled function, so that one compilation
  # (and one entry of the persistent compilation cache) serves every seed.
  init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))

  def init(init_rng: jax.Array) -> TrainState:
    variables = init_variables(model, init_rng, image_shape)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      apply_fn=model.apply,
      tx=tx,
    )

  abstract = jax.eval_shape(init, init_rng)
  shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(init_rng)

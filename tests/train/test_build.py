"""The one build: what it makes of a plan, and the plans it refuses."""

import jax
import numpy as np
import optax
import pytest
from tiny_models import tiny_spec

from micle_jax import specs
from micle_jax.runtime import sharding
from micle_jax.train import build, optim


def _plan(**changes) -> build.Plan:
  fields = dict(
    kind="pretrain",
    model=tiny_spec(num_classes=3),
    optimizer=specs.OptimizerSpec(name="lars", weight_decay=0.0),
    batch_size=8,
    total_steps=10,
    steps_per_epoch=5,
    image_size=32,
    seed=0,
    label_loss="multiclass",
  )
  return build.Plan(**{**fields, **changes})


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"kind": "probe"}, r"kind='probe' not in"),
    ({"label_loss": "chexpert"}, r"label_loss='chexpert'"),
  ],
)
def test_a_bad_plan_is_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    _plan(**changes)


def test_the_head_is_trust_scaled_in_pretraining_only():
  """LARS: pretraining's monitor head gets the trust ratio, fine-tuning's head plain momentum."""
  params = {optim.SUPERVISED_HEAD: {"kernel": np.full((4, 3), 10.0, np.float32)}}
  grads = {optim.SUPERVISED_HEAD: {"kernel": np.ones((4, 3), np.float32)}}
  updates = {}
  for kind in ("pretrain", "finetune"):
    tx = build.optimizer(_plan(kind=kind), optax.constant_schedule(1.0))
    updates[kind], _ = tx.update(grads, tx.init(params), params)
  head = lambda u: np.asarray(u[optim.SUPERVISED_HEAD]["kernel"])  # noqa: E731
  np.testing.assert_allclose(head(updates["finetune"]), -1.0)  # lr · g
  np.testing.assert_allclose(head(updates["pretrain"]), -0.001 * 10.0, rtol=1e-6)  # η‖w‖/‖g‖ · g


def test_build_makes_a_state_at_step_zero_and_its_step(num_devices):
  mesh = sharding.create_mesh(jax.devices()[:2])
  run = build.build(_plan(), mesh)
  assert int(run.state.step) == 0 and run.model.num_classes == 3
  assert float(run.schedule(0)) == 0.0  # warm-up starts at zero
  again = build.build(_plan(), mesh)  # same seed, same initialisation
  for a, b in zip(
    jax.tree_util.tree_leaves(run.state.params),
    jax.tree_util.tree_leaves(again.state.params),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)

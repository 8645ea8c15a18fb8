"""Every documented config variant builds its model and its optimizer state (traced, not run).

`jax.eval_shape` traces parameter init and the optimizer's init without compiling, so structural
mistakes (a mask that does not fit the parameters, a head that does not fit the backbone) show up
in seconds for paper-sized models too.
"""

import jax
import optax
import pytest

from configs import cxr, derm, finetune_cxr, finetune_derm, imagenet
from micle_jax import finetune, pretrain, specs
from micle_jax.models import resnet
from micle_jax.tools import benchmark_train
from micle_jax.train import build, train_state

_NUM_CLASSES = 5


def _traced_optimizer_state(model, tx, image_size: int):
  def init():
    variables = train_state.init_variables(model, jax.random.PRNGKey(0), (image_size,) * 2 + (3,))
    return tx.init(variables["params"])

  return jax.eval_shape(init)


@pytest.mark.parametrize(
  "module, arg",
  [
    (cxr, "demo"),
    (cxr, "method=simclr"),
    (cxr, "sk"),
    (cxr, "width=2.0"),
    (derm, "demo"),
    (derm, "demo,source=generic,method=simclr"),
    (imagenet, None),
  ],
)
def test_pretraining_variants_build(module, arg):
  spec = specs.from_config(specs.PretrainSpec, module.get_config(arg))
  classes = benchmark_train.monitor_classes(spec)
  plan = pretrain.plan(spec, num_classes=classes, total_steps=100, steps_per_epoch=10)
  _check_traces(plan)


def test_cxr_pretraining_views_are_set_apart_from_the_probes():
  """The CXR demo pretrains on frontal images unless told otherwise (pairs within a study need
  the lateral); the probe scores frontal images either way, as fine-tuning does."""
  assert cxr.get_config("demo").dataset.views == "frontal"
  paper = cxr.get_config("")
  assert (paper.dataset.views, paper.probe.views) == ("all", "frontal")
  both = cxr.get_config("demo,studies,views=all")
  assert (both.dataset.views, both.probe.views) == ("all", "frontal")
  assert both.dataset.name == "chexpert_micle/studies"


def _check_traces(plan: build.Plan) -> None:
  """The plan's model and optimizer state trace, as `build.build` would make them."""
  tx = build.optimizer(plan, optax.constant_schedule(0.1))
  state = _traced_optimizer_state(resnet.create_model(plan.model), tx, plan.image_size)
  assert jax.tree_util.tree_leaves(state)


@pytest.mark.parametrize(
  "module, arg",
  [
    (finetune_cxr, "demo"),
    (finetune_cxr, "linear"),
    (finetune_cxr, "demo,linear,no_shift"),
    (finetune_cxr, "sk,selector=1"),
    (finetune_cxr, "width=2.0"),
    (finetune_derm, "demo"),
    (finetune_derm, "linear"),
    (finetune_derm, "sk,selector=2"),
    (finetune_derm, "demo,source=generic,external"),
  ],
)
def test_finetuning_variants_build(module, arg):
  spec = finetune.validate(module.get_config(arg))
  plan = finetune.plan(spec, num_classes=_NUM_CLASSES, total_steps=100, steps_per_epoch=10)
  _check_traces(plan)

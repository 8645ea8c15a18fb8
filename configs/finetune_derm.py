r"""Fine-tuning on dermatology (case-level top-1/top-3 accuracy), e.g. HAM10000.

Paper scale (not timed by us):
  python -m micle_jax.finetune --config=configs/finetune_derm.py \
      --config.init_from=gs://BUCKET/derm_micle_r50x1 --workdir=gs://BUCKET/ft_derm \
      --config.label_fraction=0.2
Predictions are averaged over each case's images before accuracy; CIs resample patients.
`external` evaluates, zero-shot, on the cases of another clinic that a generic case CSV marks
with split `external` (the synthetic teledermatology data has them); any other source with the
same classes can be added under `config.shift`.

Demo: python -m micle_jax.finetune --config=configs/finetune_derm.py:demo --workdir=DIR

Variants: `demo`, `linear`, `fraction=0.1`, `source=ham10000|pad_ufes20|generic`, `depth=50`,
`width=2.0`, `sk`, `selector=0`, `external`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    demo=False,
    linear=False,
    fraction=1.0,
    source="ham10000",
    depth=50,
    width=1.0,
    sk=False,
    selector=0,
    external=False,
  )
  c = common.finetune_base()
  c.labels.task = "multiclass"
  c.mode = "linear" if a.linear else "full"
  c.label_fraction = a.fraction
  c.dataset.name = f"derm/{a.source}_images"
  c.dataset.eval_split = "test"
  c.eval_aggregation = "case"
  c.augment.preset = "derm"
  c.model.update(
    depth=a.depth,
    width=a.width,
    sk_ratio=0.0625 if a.sk else 0.0,
    proj_layers_kept=a.selector,
    supervised_input_layer=a.selector,
  )
  if a.external and a.source != "generic":
    raise ValueError(
      f"config argument external: only a generic case CSV has an external split, not {a.source}"
    )
  if a.external:  # the cases of another clinic, split `external` of the same build
    c.shift.external = ml_collections.ConfigDict(
      dict(name=c.dataset.name, split="external", data_dir="", task="multiclass", views="all")
    )
  if a.demo:
    common.make_finetune_demo(c)
    if a.external:
      c.shift.external.data_dir = c.dataset.data_dir
  c.lock()
  return c

r"""Fine-tuning on CheXpert (5 competition conditions, U-Ones) with NIH ChestX-ray14 as shift.

Paper scale (not timed by us):
  python -m micle_jax.finetune --config=configs/finetune_cxr.py \
      --config.init_from=gs://BUCKET/cxr_micle_r50x1 --workdir=gs://BUCKET/ft_cxr_micle_f10 \
      --config.label_fraction=0.1
Trains and evaluates on frontal images (`dataset.views`), like the frontal-only NIH shift set, so
the shift comparison is like with like; `views=all` reads laterals too. Evaluates mean AUC (and
per condition) on `validation` and zero-shot on NIH `test`, on the whole image (no centre crop),
with bootstrap 95% CIs over patients; `study` scores studies (mean over a study's images).

Demo (after `make demo`): python -m micle_jax.finetune --config=configs/finetune_cxr.py:demo \
    --config.init_from=workdirs/cxr_demo --workdir=workdirs/ft_cxr_demo

Variants: `demo`, `linear` (frozen backbone), `fraction=0.1`, `depth=50`, `width=2.0`, `sk`,
`selector=1` (ft_proj_selector: keep the first k projection-head layers), `no_shift`,
`views=all|frontal|ap|pa`, `study`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    demo=False,
    linear=False,
    fraction=1.0,
    depth=50,
    width=1.0,
    sk=False,
    selector=0,
    no_shift=False,
    views="frontal",
    study=False,
  )
  c = common.finetune_base()
  c.labels.task = "chexpert"
  c.mode = "linear" if a.linear else "full"
  c.label_fraction = a.fraction
  c.dataset.name = "chexpert_micle/images"
  c.dataset.views = a.views
  c.eval_aggregation = "study" if a.study else "image"
  c.augment.preset = "cxr"
  c.model.update(
    depth=a.depth,
    width=a.width,
    sk_ratio=0.0625 if a.sk else 0.0,
    proj_layers_kept=a.selector,
    supervised_input_layer=a.selector,
  )
  if not a.no_shift:
    c.shift.nih = ml_collections.ConfigDict(
      dict(name="nih_cxr14/images", split="test", data_dir="", task="nih", views="frontal")
    )
  if a.demo:
    common.make_finetune_demo(c)
    if not a.no_shift:
      c.shift.nih.data_dir = c.dataset.data_dir
  c.lock()
  return c

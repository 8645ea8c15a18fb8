r"""SimCLR pretraining on ImageNet (`imagenet2012` through TFDS), the first stage of the paper.

Paper scale (SimCLRv2 recipe; a TPU pod for days; not timed by us):
  python -m micle_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/imagenet_simclr
  ResNet-50 1×, 224 px, global batch 4096, LARS 0.3·B/256 = 4.8, τ = 0.1, 800 epochs (`epochs=`),
  weight decay 1e-6, the full SimCLR augmentation. The ImageNet archives must be placed in TFDS's
  manual dir first (see the TFDS `imagenet2012` page). Most users start from the published
  SimCLRv2 weights instead: see docs/convert_simclr.md.

Demo (no ImageNet needed; synthetic HAM10000-style photos stand in, 2 CPU cores, minutes):
  python -m micle_jax.main --config=configs/imagenet.py:demo --workdir=workdirs/imagenet_demo

Variants: `demo`, `depth=50`, `width=2.0`, `sk`, `batch=4096`, `epochs=800`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, demo=False, depth=50, width=1.0, sk=False, batch=4096, epochs=800)
  c = common.pretrain_base()
  c.method = "simclr"
  c.dataset.name = "imagenet2012"
  c.augment.preset = "simclr"
  c.labels.task = "multiclass"
  c.model.update(depth=a.depth, width=a.width, sk_ratio=0.0625 if a.sk else 0.0)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.optimizer.update(base_learning_rate=0.3, lr_scaling="linear")
  if a.demo:
    common.make_demo(c)
    c.dataset.name = "derm/ham10000_images"
    c.dataset.data_dir = "data/tensorflow_datasets"
  c.lock()
  return c

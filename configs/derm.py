r"""SimCLR / MICLe pretraining on dermatology cases (`derm`: HAM10000, PAD-UFES-20, own CSV).

Paper scale (TPU pod slice; not timed by us):
  python -m micle_jax.main --config=configs/derm.py --workdir=gs://BUCKET/derm_micle_r50x1
  ResNet-50 1×, 224 px, global batch 1024, LARS 0.075·√B, τ = 0.1,
  100 epochs over the images (the same number of steps for SimCLR and MICLe),
  SimCLR augmentation with a mild rotation (`derm` preset). Source: `source=ham10000` (default),
  `pad_ufes20` or `generic` (your case CSV).

Demo (synthetic HAM10000-style data, 2 CPU cores, a few minutes after preparing it with
  python -m data_builders.synthetic --layout=ham10000 --out=data/manual/ham10000
  python -m data_builders.build derm/ham10000_cases --manual_dir=data/manual/ham10000 \
      --data_dir=data/tensorflow_datasets):
  python -m micle_jax.main --config=configs/derm.py:demo --workdir=workdirs/derm_demo

Variants: `demo`, `method=simclr|micle`, `source=ham10000|pad_ufes20|generic`, `depth=50`,
`width=2.0`, `sk`, `batch=1024`, `epochs=100`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    demo=False,
    method="micle",
    source="ham10000",
    depth=50,
    width=1.0,
    sk=False,
    batch=1024,
    epochs=100,
  )
  c = common.pretrain_base()
  c.method = a.method
  form = "cases" if a.method == "micle" else "images"
  c.dataset.name = f"derm/{a.source}_{form}"
  c.augment.preset = "derm"
  c.labels.task = "multiclass"
  c.probe.update(dataset=f"derm/{a.source}_images", split="train", task="multiclass")
  c.model.update(depth=a.depth, width=a.width, sk_ratio=0.0625 if a.sk else 0.0)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  if a.demo:
    common.make_demo(c)
    c.dataset.data_dir = "data/tensorflow_datasets"  # the probe reads there too
    c.augment.preset = "derm_small"  # 32 px: larger crops, milder jitter (augment_presets.py)
    # LARS 1.0, not the chest X-ray demo's 3.0: at 3.0 most pretrainings on these photos diverged
    # (contrastive loss above chance). Chosen on generator seed 1 (docs/study_derm.md).
    c.optimizer.base_learning_rate = 1.0
  c.lock()
  return c

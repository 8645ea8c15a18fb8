r"""SimCLR / MICLe pretraining on CheXpert (`chexpert_micle`), as in Azizi et al. 2021.

Paper scale (TPU pod slice; not timed by us):
  python -m micle_jax.main --config=configs/cxr.py --workdir=gs://BUCKET/cxr_micle_r50x1
  ResNet-50 1×, 224 px, global batch 1024, LARS 0.075·√B, τ = 0.1,
  100 epochs over the images (the same number of steps for SimCLR and MICLe),
  chest X-ray augmentation (crop, rotation ±45°, jitter 0.5, flip, no blur).
  ImageNet → CXR chaining: add --config.init_from=<ImageNet SimCLR workdir or converted weights>.

Demo (synthetic CheXpert-style data, 2 CPU cores, ~2 minutes after `make demo` prepared it):
  python -m micle_jax.main --config=configs/cxr.py:demo --workdir=workdirs/cxr_demo
  ResNet-18 ×0.25 at 32 px, frontal images, batch 32, 16 epochs over images (~500 steps).

Variants (comma-separated): `demo`, `method=simclr|micle`, `depth=50`, `width=2.0`, `sk`
(selective kernels, sk_ratio 0.0625), `batch=4096`, `epochs=100`, `studies` (a case is one study
instead of one patient), `views=all|frontal|ap|pa` (the pretraining's view filter, independent of
fine-tuning's; default all, the demo's frontal).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(
    arg,
    demo=False,
    method="micle",
    depth=50,
    width=1.0,
    sk=False,
    batch=1024,
    epochs=100,
    studies=False,
    views="",
  )
  c = common.pretrain_base()
  c.method = a.method
  # MICLe pairs two images of one case; SimCLR pairs two views of one image.
  cases = "studies" if a.studies else "patients"
  c.dataset.name = f"chexpert_micle/{cases}" if a.method == "micle" else "chexpert_micle/images"
  c.augment.preset = "cxr"
  c.labels.task = "chexpert"
  c.labels.uncertainty_policy = "ones"
  c.dataset.views = a.views or "all"
  # The probe scores frontal images, as fine-tuning and the NIH shift set do, whatever the
  # pretraining reads (pairs within a study need the lateral).
  c.probe.update(dataset="chexpert_micle/images", split="train", task="chexpert", views="frontal")
  c.model.update(depth=a.depth, width=a.width, sk_ratio=0.0625 if a.sk else 0.0)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  if a.demo:
    common.make_demo(c)
    c.dataset.data_dir = "data/tensorflow_datasets"  # the probe reads there too
    # Frontal images only, as the fine-tuning and the NIH shift set read (unless `views=` says
    # otherwise: pairs within a study need the lateral); no supervised monitor (the kNN probe
    # measures the representation without training anything on labels).
    c.dataset.views = a.views or "frontal"
    c.augment.preset = "cxr_small"
    c.labels.task = "none"
  c.lock()
  return c

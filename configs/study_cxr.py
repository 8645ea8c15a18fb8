r"""The paper's chest X-ray study as one command: pretrain SimCLR and MICLe at equal budgets over
several pretraining seeds, then fine-tune scratch, SimCLR and MICLe at several label fractions and
seeds, and compare with intervals over training runs and patients.

  python -m micle_jax.study --config=configs/study_cxr.py:demo   # `make demo`: one pretraining seed
  python -m micle_jax.study --config=configs/study_cxr.py:cpu    # 3 pretraining seeds (docs/study.md)
  python -m micle_jax.study --config=configs/study_cxr.py:demo,pairs   # positive-pair policies
  python -m micle_jax.study --config=configs/study_cxr.py --print_only --config.root=gs://B/study
      # paper scale: prints one command per pretraining and fine-tuning run, for a TPU fleet

Variants: `demo` (one pretraining seed, one fine-tuning seed, label fractions 5% and 100%, on the
synthetic data `make demo` writes; its intervals are conditional on its one pretraining run per
method), `cpu` (the demo's models and data, twice the pretraining, pretraining seeds 0, 1 and 2,
label fractions 5%, 25% and 100%, fine-tuning seeds 0 and 1; with `pairs` fine-tuning seed 0
only), and `pairs` with either or neither
(the positive-pair policies of MedAug, Vu et al. 2021: two views of one image, two images of one
study across views, two images of one patient; every arm pretrains on frontal and lateral images,
fine-tuning and evaluation read frontal ones). `--config.init_from=DIR` starts
every pretraining from, e.g., converted SimCLRv2 ImageNet weights (the paper's ImageNet → domain
chain). `--config.imagenet=DIR` (torchvision/timm weights imported by `micle_jax.import_torch`)
runs the paper's comparison: the supervised ImageNet baseline, ImageNet → SimCLR and ImageNet →
MICLe, beside scratch (docs/import_torch.md).

Every `pretrain`/`finetune` override is a nested dict of config keys. `init_overrides` gives one
init its own fine-tuning hyperparameters: the demo's (a scratch learning rate of 1.0 against
0.01 for the pretrained inits) were chosen on synthetic data of another seed than the one the
demo reports (docs/study.md).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, demo=False, cpu=False, pairs=False)
  c = common.study_base(
    root="workdirs/study_cxr",
    pretrain_config="configs/cxr.py",
    finetune_config="configs/finetune_cxr.py",
  )
  if a.demo or a.cpu:
    c.root = "workdirs/study_demo" if a.demo else "workdirs/study_cpu"
    c.pretrain.arg = c.finetune.arg = "demo"
    c.fractions = (0.05, 1.0)
    c.seeds = (0,)
    c.pretrain_seeds = (0,)
    c.init_overrides.scratch = dict(optimizer=dict(base_learning_rate=1.0))
  if a.pairs:
    # What a positive pair is: two views of one image (simclr), two images of one study
    # (micle_study: a frontal and its lateral, or two frontals) or two images of one patient
    # (micle). Every arm pretrains on all views, the same images at the same budget; fine-tuning
    # and evaluation stay frontal.
    c.root = (
      c.root.replace("study_", "study_pairs_") if (a.demo or a.cpu) else "workdirs/study_pairs"
    )
    c.methods = ("simclr", "micle_study", "micle")
    c.method_args = ml_collections.ConfigDict(
      dict(
        simclr="method=simclr,views=all",
        micle_study="method=micle,studies,views=all",
        micle="method=micle,views=all",
      )
    )
  if a.cpu:
    c.pretrain.overrides.num_epochs = 32
    c.pretrain_seeds = (0, 1, 2)
    c.fractions = (0.05, 0.25, 1.0)
    c.seeds = (0, 1)
    if a.pairs:
      # Four arms, pretrained on the laterals too: one fine-tuning seed per pretraining run keeps
      # the study under an hour on 2 cores; its intervals still resample the pretraining runs.
      c.seeds = (0,)
  c.lock()
  return c

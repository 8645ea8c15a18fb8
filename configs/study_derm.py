r"""The paper's dermatology study as one command: MICLe where the paper uses it, on cases of
one to six camera photos of one skin condition.

  python -m data_builders.synthetic.demo --data=data --layouts=teledermatology   # or make derm-data
  python -m micle_jax.study --config=configs/study_derm.py:demo   # one pretraining seed (make derm-study)
  python -m micle_jax.study --config=configs/study_derm.py:cpu    # 3 pretraining seeds (docs/study_derm.md)
  python -m micle_jax.study --config=configs/study_derm.py --print_only --config.root=gs://B/derm
      # paper scale, on your own case CSV (derm/generic_*): one command per run, for a TPU fleet

Pretrains SimCLR and MICLe at equal budgets over the pretraining seeds on the training cases of
`derm/generic_cases` (the synthetic teledermatology cases, or your own `cases.csv`), fine-tunes
scratch, SimCLR and MICLe at several label fractions of the training cases, and evaluates
case-level top-1 and top-3 accuracy on the test cases and, zero-shot, on the external clinic's
cases (split `external`), with intervals over pretraining runs, fine-tuning runs and patients.
`--config.imagenet=DIR` adds the supervised ImageNet baseline and the ImageNet → SimCLR/MICLe
chain (docs/import_torch.md).

Variants: `demo` (one pretraining seed, one fine-tuning seed, label fractions 10% and 100%;
intervals conditional on its one pretraining run per method), `cpu` (twice the pretraining,
pretraining seeds 0, 1 and 2, label fractions 10%, 30% and 100%, fine-tuning seeds 0 and 1).
Chosen on synthetic data of generator seed 1, which no reported table uses (docs/study_derm.md): the
`derm_small` pretraining augmentation and LARS 1.0 (configs/derm.py:demo), the fine-tuning
learning rate of the pretrained inits (0.01, as for chest X-rays) and scratch's (0.3); the rest is
the chest X-ray demo's.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, demo=False, cpu=False)
  c = common.study_base(
    root="workdirs/study_derm",
    pretrain_config="configs/derm.py",
    pretrain_arg="source=generic",
    finetune_config="configs/finetune_derm.py",
    finetune_arg="source=generic,external",
  )
  if a.demo or a.cpu:
    c.root = "workdirs/study_derm_demo" if a.demo else "workdirs/study_derm_cpu"
    c.pretrain.arg = "demo,source=generic"
    c.finetune.arg = "demo,source=generic,external"
    c.fractions = (0.1, 1.0)
    c.seeds = (0,)
    c.pretrain_seeds = (0,)
    c.init_overrides.scratch = dict(optimizer=dict(base_learning_rate=0.3))
  if a.cpu:
    c.pretrain.overrides.num_epochs = 32
    c.pretrain_seeds = (0, 1, 2)
    c.fractions = (0.1, 0.3, 1.0)
    c.seeds = (0, 1)
  c.lock()
  return c

"""Pieces shared by the configs (imports nothing but ml_collections)."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `get_config`'s argument "demo,method=simclr,width=2" against typed defaults.

  A bare word sets a boolean default to True; `key=value` is converted to the default's type.
  Unknown keys and badly typed values fail, naming the key.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; valid: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
          f"config argument {key}={value!r}: expected {type(default).__name__}"
        ) from e
  return out


# The demo's tiny model (pretraining and fine-tuning must agree for init_from to load).
DEMO_MODEL = dict(depth=18, width=0.25, stem="cifar", num_proj_layers=2, proj_out_dim=64)


def _model_section(**extra) -> ml_collections.ConfigDict:
  """SimCLRv2's ResNet-50 1× with a 3-layer projection head to 128 (`model.*` keys)."""
  return ml_collections.ConfigDict(
    dict(
      depth=50,
      width=1.0,
      sk_ratio=0.0,
      stem="imagenet",
      variant="simclr",  # "torchvision" for weights imported from torchvision/timm
      dtype="float32",
      num_proj_layers=3,
      proj_out_dim=128,
      supervised_input_layer=0,
      **extra,
    )
  )


def _labels_section(*, task: str) -> ml_collections.ConfigDict:
  """How labels are read, in pretraining and fine-tuning alike (`labels.*` keys)."""
  return ml_collections.ConfigDict(
    dict(task=task, label_set="competition5", uncertainty_policy="ones")
  )


def _lars_section(
  *, base_learning_rate: float, weight_decay: float, warmup_epochs: float
) -> ml_collections.ConfigDict:
  """LARS (momentum 0.9, η 0.001) with sqrt batch scaling (`optimizer.*` keys)."""
  return ml_collections.ConfigDict(
    dict(
      name="lars",
      base_learning_rate=base_learning_rate,
      lr_scaling="sqrt",
      weight_decay=weight_decay,
      momentum=0.9,
      trust_coefficient=0.001,
      warmup_epochs=warmup_epochs,
      b2=0.999,
    )
  )


def pretrain_base() -> ml_collections.ConfigDict:
  """Keys every pretraining config has, with SimCLR(v2)'s defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "micle"  # "simclr" (two views of one image) or "micle" (two images of one case)
  c.temperature = 0.1
  c.batch_size = 1024  # global, over all devices and hosts
  # Epochs count passes over the split's *images* whatever the method, so SimCLR and MICLe with
  # the same config run the same number of steps and see the same number of views.
  c.num_epochs = 100
  c.num_steps = -1  # > 0 overrides num_epochs
  # views: "all", "frontal", "ap" or "pa" (chest X-rays; a case keeps the images that pass).
  c.dataset = ml_collections.ConfigDict(
    dict(name="", split="train", data_dir="", shuffle_buffer=10_000, views="all")
  )
  c.augment = ml_collections.ConfigDict(dict(preset="simclr", image_size=224))
  # Supervised monitor (SimCLR's linear head on stop-gradient features): "none", "multiclass"
  # (feature `label`) or "chexpert" (raw observations + label_set + uncertainty_policy).
  c.labels = _labels_section(task="none")
  # kNN probe of the backbone's features at step 0 and every checkpoint (probe/* in TensorBoard):
  # the first max_images labelled images of `split` ("" dataset: off; "" data_dir: the
  # pretraining dataset's). Never trains anything.
  c.probe = ml_collections.ConfigDict(
    dict(
      dataset="",
      split="train",
      data_dir="",
      task="chexpert",
      views="all",
      max_images=512,
      k=20,
      batch_size=128,
    )
  )
  c.model = _model_section()
  # LARS with lr = 0.075·√B (better than 0.3·B/256 at small batch), 10 warm-up epochs, cosine.
  c.optimizer = _lars_section(base_learning_rate=0.075, weight_decay=1e-6, warmup_epochs=10.0)
  c.init_from = ""  # a pretraining workdir or Orbax checkpoint (e.g. converted SimCLRv2 weights)
  # From init_from: the backbone always, the projection head when True (it must then match);
  # never the supervised monitor, which saw labels.
  c.init_projection_head = True
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.max_steps_per_run = -1  # > 0: save and stop after this many steps (time-boxed jobs)
  c.profile_steps = 0  # > 0: capture a profile of this many steps after the first log
  return c


def make_demo(c: ml_collections.ConfigDict) -> None:
  """Shrinks a pretraining config to minutes on 2 CPU cores (tiny ResNet, 32 px, ~500 steps).

  Chosen on synthetic data of another seed than the demo's (see docs/study.md): batch 32 (63
  negatives) lets a tiny network reach a useful contrastive accuracy within the budget; LARS at
  3.0 without batch scaling, 2 warm-up epochs.
  """
  c.model.update(DEMO_MODEL)
  c.augment.image_size = 32
  c.batch_size = 32
  c.num_epochs = 16
  c.optimizer.update(lr_scaling="none", base_learning_rate=3.0, warmup_epochs=2.0)
  c.dataset.shuffle_buffer = 1000
  c.log_every_steps = 10
  c.checkpoint_every_steps = 250


def finetune_base() -> ml_collections.ConfigDict:
  """Keys every fine-tuning config has (SimCLRv2-style fine-tuning: LARS, no decay, no warm-up)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # also picks the label-fraction subset and the bootstrap resamples
  c.init_from = ""  # a pretraining workdir, an Orbax checkpoint, or "" / "scratch"
  # init_from's step: -1 takes its latest, which must be its pretraining's planned last step.
  c.init_step = -1
  # Seed of the random initialisation (what init_from does not restore); -1: `seed`. A study's
  # scratch arm varies it as pretrained arms vary their pretraining.
  c.init_seed = -1
  c.mode = "full"  # "full" fine-tuning, or "linear" (frozen backbone, linear head)
  c.label_fraction = 1.0  # of training patients; nested subsets for one seed
  # views: "all", "frontal", "ap" or "pa" (chest X-rays), for training and the in-distribution eval.
  c.dataset = ml_collections.ConfigDict(
    dict(
      name="",
      train_split="train",
      eval_split="validation",
      data_dir="",
      shuffle_buffer=10_000,
      views="all",
    )
  )
  # The labels trained on: task "chexpert" | "nih" (multi-label AUC) or "multiclass" (top-1/top-3).
  c.labels = _labels_section(task="chexpert")
  c.augment = ml_collections.ConfigDict(dict(preset="cxr", image_size=224))
  # ft_proj_selector = proj_layers_kept = supervised_input_layer (0: head on backbone features).
  # init_from restores the backbone and those layers only; the supervised head starts at zero.
  c.model = _model_section(proj_layers_kept=0, zero_init_head=True)
  c.optimizer = _lars_section(base_learning_rate=0.005, weight_decay=0.0, warmup_epochs=0.0)
  c.batch_size = 256
  c.eval_batch_size = 256
  c.num_epochs = 30
  c.num_steps = -1
  # name -> {name, split, data_dir, task, views}: zero-shot evaluations under distribution shift.
  c.shift = ml_collections.ConfigDict()
  # What an evaluation scores: multi-label "image" or "study" (mean over a study's images);
  # multi-class "case" (mean over a case's images) or "image".
  c.eval_aggregation = "image"
  c.bootstrap_samples = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.max_steps_per_run = -1
  c.profile_steps = 0
  return c


def make_finetune_demo(c: ml_collections.ConfigDict) -> None:
  """Matches `make_demo`'s tiny model; seconds per run on 2 CPU cores.

  Every label fraction gets the same 150 steps of batch 32. The learning rate, 0.01, suits a
  pretrained network (the best of the rates tried on data the demo does not report); a network
  trained from scratch needs a larger one, which the study config gives the scratch init
  (docs/study.md).
  """
  c.model.update(DEMO_MODEL)
  c.augment.image_size = 32
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_steps = 150
  c.optimizer.update(name="sgd", base_learning_rate=0.01, lr_scaling="none", warmup_epochs=1.0)
  c.dataset.data_dir = "data/tensorflow_datasets"
  c.dataset.shuffle_buffer = 1000
  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000  # only at the end: a save blocks for ~1.5 s on this CPU


def study_base(
  *,
  root: str,
  pretrain_config: str,
  finetune_config: str,
  pretrain_arg: str = "",
  finetune_arg: str = "",
) -> ml_collections.ConfigDict:
  """Keys every study config (`python -m micle_jax.study`) has, at paper scale."""
  c = ml_collections.ConfigDict()
  c.root = root
  c.methods = ("simclr", "micle")
  # An arm's pretraining config argument ("method=<arm>" unless named here, e.g. a positive-pair
  # policy "method=micle,studies"); set in a config file.
  c.method_args = ml_collections.ConfigDict()
  # Each method is pretrained once per seed; a study's intervals include the variance between
  # these runs only when there are at least two (one run: they are conditional on it).
  c.pretrain_seeds = (0, 1, 2)
  c.scratch = True  # also fine-tune from random weights (one init seed per pretraining seed)
  # Pretraining: `config` with `arg` (and the arm's method argument), then `overrides`. All arms
  # share every other key, so they run the same number of steps (checked).
  c.pretrain = ml_collections.ConfigDict(
    dict(config=pretrain_config, arg=pretrain_arg, overrides=ml_collections.ConfigDict())
  )
  c.init_from = ""  # e.g. converted SimCLRv2 ImageNet weights, for every pretraining
  # The paper's design: a folder of supervised ImageNet weights (python -m micle_jax.import_torch)
  # adds the `supervised` arm (fine-tuned from them), starts every pretraining from them
  # (ImageNet → SimCLR/MICLe; imagenet_chain=False: from random weights) and gives every run
  # their architecture (docs/import_torch.md).
  c.imagenet = ""
  c.imagenet_chain = True
  # The TFDS data dir of every dataset the study reads ("": each config's own), e.g. another draw
  # of the synthetic data (python -m data_builders.synthetic.demo --data=D --seed=N; D/tensorflow_datasets).
  c.data_dir = ""
  c.finetune = ml_collections.ConfigDict(
    dict(config=finetune_config, arg=finetune_arg, overrides=ml_collections.ConfigDict())
  )
  c.init_overrides = ml_collections.ConfigDict()  # init name -> nested config overrides
  c.fractions = (0.1, 0.2, 0.5, 1.0)
  c.seeds = (0, 1, 2)
  c.bootstrap_samples = 1000
  # JAX's persistent compilation cache under ROOT/jax_cache: runs of one shape compile once.
  c.compilation_cache = True
  return c

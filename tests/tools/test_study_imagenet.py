"""The study with imported supervised ImageNet weights (`config.imagenet`): the paper's design
planned from one key, and its supervised baseline fine-tuned and compared end to end. (In a file
of its own so that the suite's workers share the study's end-to-end tests.)"""

import json
import shlex

import pytest
import torch
from test_study import _study
from torchvision_clone import tv_resnet

from micle_jax import specs
from micle_jax.tools import import_torch, study


def _imported(tmp_path) -> str:
  """torchvision-style ResNet-18 weights (random, 5 classes), imported as a user would."""
  torch.manual_seed(0)
  torch.save(tv_resnet(18, 5).state_dict(), tmp_path / "resnet18.pth")
  out = tmp_path / "imagenet"
  import_torch.import_weights(str(tmp_path / "resnet18.pth"), str(out))
  return str(out)


def test_imagenet_weights_add_the_supervised_baseline_and_the_chain(
  cxr_data_dir, nih_data_dir, tmp_path
):
  """One key runs the paper's design: the supervised arm, ImageNet → SimCLR/MICLe, every run
  with the imported architecture; contradictions are refused before any work."""
  imagenet = _imported(tmp_path)
  s = _study(tmp_path / "study", cxr_data_dir, nih_data_dir, imagenet=imagenet)
  pretrainings = study.plan_pretraining(s)
  for p in pretrainings:
    assert p.config.init_from == imagenet and not p.config.init_projection_head
    assert (p.config.model.depth, p.config.model.width, p.config.model.stem) == (
      18,
      1.0,
      "imagenet",
    )
    assert p.config.model.variant == "torchvision" and p.config.model.proj_out_dim == 16
  finetunings = study.plan_finetuning(s, pretrainings)
  assert [r.init for r in finetunings] == ["scratch", "supervised", "simclr", "micle"]
  supervised = finetunings[1]
  assert supervised.init_from == imagenet
  assert supervised.workdir == str(tmp_path / "study/finetune/supervised/imagenet/f0.5/s0")
  assert {r.config.model.variant for r in finetunings} == {"torchvision"}
  assert supervised.config.optimizer.base_learning_rate == 0.01  # scratch's override is its own
  lines = study.commands(s, pretrainings, finetunings)
  assert "--config.model.variant=torchvision" in shlex.split(lines[0])
  assert f"--config.init_from={imagenet}" in shlex.split(lines[0])
  assert "--config.init_projection_head=false" in shlex.split(lines[0])
  assert "--config.model.variant=torchvision" in shlex.split(lines[2])
  with s.unlocked():
    s.imagenet_chain = False
  assert {p.config.init_from for p in study.plan_pretraining(s)} == {""}
  with s.unlocked():
    s.init_from = imagenet
  with pytest.raises(specs.ConfigError, match="set one"):
    study.plan_pretraining(s)
  with s.unlocked():
    s.init_from = ""
    s.pretrain.overrides.model.depth = 50
  with pytest.raises(specs.ConfigError, match=r"pretrain.overrides.model.depth=50, but"):
    study.plan_pretraining(s)
  with s.unlocked():
    del s.pretrain.overrides.model["depth"]
    s.imagenet_chain = True
    s.pretrain.overrides.init_projection_head = True  # the weights have no projection head
  with pytest.raises(specs.ConfigError, match=r"init_projection_head=True, but .* need False"):
    study.plan_pretraining(s)
  with s.unlocked():
    del s.pretrain.overrides["init_projection_head"]
    s.init_overrides.scratch.model = dict(variant="simclr")
  pretrainings = study.plan_pretraining(s)
  with pytest.raises(specs.ConfigError, match=r"init_overrides.scratch.model.variant='simclr'"):
    study.plan_finetuning(s, pretrainings)
  with s.unlocked():
    del s.init_overrides.scratch["model"]
    s.finetune.overrides.model.proj_layers_kept = 1
  with pytest.raises(specs.ConfigError, match="proj_layers_kept=1: the supervised arm"):
    study.plan_finetuning(s, pretrainings)
  with s.unlocked():
    s.imagenet = str(tmp_path)
  with pytest.raises(specs.ConfigError, match="no conversion.json there"):
    study.plan_pretraining(s)


def test_imagenet_study_end_to_end(cxr_data_dir, nih_data_dir, tmp_path, capsys):
  """The supervised baseline fine-tuned from imported weights beside scratch (with the imported
  architecture), compared; the table names the chain. (Pretraining from imported weights is
  planned above and restored in test_imported_weights_start_a_pretraining: a width-1 contrastive
  step would double this test's time.)"""
  imagenet = _imported(tmp_path)
  s = _study(
    tmp_path / "study",
    cxr_data_dir,
    nih_data_dir,
    imagenet=imagenet,
    methods=(),
    pretrain_seeds=(0,),
  )
  with s.unlocked():
    s.finetune.overrides.num_steps = 2
  _, arms, diffs = study.run_study(s)
  main = [d for d in diffs if d["metric"] == "mean_auc"]
  assert {(d["init"], d["baseline"]) for d in main} == {("supervised", "scratch")}
  assert {a["init"]: a["chain"] for a in arms} == {
    "supervised": "ImageNet supervised resnet18 (resnet18.pth)",
    "scratch": "random init",
  }
  config = json.loads((tmp_path / "study/finetune/scratch/p0/f0.5/s0/config.json").read_text())
  assert config["model"]["variant"] == "torchvision" and config["model"]["width"] == 1.0
  out = capsys.readouterr().out
  assert "Chains:\n  scratch: random init\n  supervised: ImageNet supervised resnet18" in out
  assert "the one set of imported ImageNet weights" in out

"""The study command: equal pretraining budgets, the planned runs and commands over pretraining
seeds, and a tiny study end to end (two pretraining seeds of both methods, three arms fine-tuned,
the tables with intervals over runs; a rerun trains nothing)."""

import json
import shlex

import pytest
from ml_collections import config_dict

from configs import study_cxr
from micle_jax import specs
from micle_jax.eval import differences
from micle_jax.tools import study


def _study(root, cxr_dir, nih_dir, arg="demo", **overrides):
  s = study_cxr.get_config(arg)
  with s.unlocked():
    s.root = str(root)
    s.fractions = (0.5,)
    s.bootstrap_samples = 50
    s.compilation_cache = False  # the suite has its own (conftest)
    s.pretrain.overrides = config_dict.ConfigDict(
      dict(
        num_steps=4,
        batch_size=8,
        checkpoint_every_steps=2,
        dataset=dict(data_dir=cxr_dir),
        probe=dict(data_dir=cxr_dir, max_images=16, k=3, batch_size=16),
        model=dict(proj_out_dim=16),
      )
    )
    s.finetune.overrides = config_dict.ConfigDict(
      dict(
        num_steps=3,
        batch_size=8,
        eval_batch_size=16,
        model=dict(proj_out_dim=16),
        dataset=dict(data_dir=cxr_dir),
        shift=dict(nih=dict(data_dir=nih_dir)),
      )
    )
    for key, value in overrides.items():
      s[key] = value
  return s


def test_the_plan_pretrains_every_seed_and_fine_tunes_every_network_as_often(
  cxr_data_dir, nih_data_dir, tmp_path
):
  s = _study(
    tmp_path, cxr_data_dir, nih_data_dir, fractions=(0.05, 1.0), seeds=(0, 1), pretrain_seeds=(3, 4)
  )
  pretrainings = study.plan_pretraining(s)
  assert [(p.method, p.seed) for p in pretrainings] == [
    ("simclr", 3),
    ("simclr", 4),
    ("micle", 3),
    ("micle", 4),
  ]
  assert [p.config.seed for p in pretrainings] == [3, 4, 3, 4]
  assert pretrainings[3].workdir == str(tmp_path / "pretrain/micle/p4")
  assert study.check_equal_budgets(pretrainings) == {"simclr": 4, "micle": 4}
  finetunings = study.plan_finetuning(s, pretrainings)
  # Every arm: 2 level-1 units (pretrainings, or scratch's initialisation seeds) × 2 × 2.
  assert len(finetunings) == 3 * 2 * 2 * 2
  assert [(r.init, r.init_seed, r.label_fraction, r.seed) for r in finetunings][:3] == [
    ("scratch", 3, 0.05, 0),
    ("scratch", 3, 0.05, 1),
    ("scratch", 3, 1.0, 0),
  ]
  assert finetunings[0].workdir == str(tmp_path / "finetune/scratch/p3/f0.05/s0")
  assert {r.config.init_seed for r in finetunings if r.init == "scratch"} == {3, 4}
  assert {r.config.init_seed for r in finetunings if r.init != "scratch"} == {-1}
  lr = {r.init: r.config.optimizer.base_learning_rate for r in finetunings}
  assert lr["scratch"] == 1.0 and lr["micle"] == lr["simclr"] == 0.01
  assert {r.init_from for r in finetunings if r.init == "micle"} == {
    str(tmp_path / "pretrain/micle/p3"),
    str(tmp_path / "pretrain/micle/p4"),
  }
  lines = study.commands(s, pretrainings, finetunings)
  assert len(lines) == 4 + 24 + 1
  assert shlex.split(lines[0])[:4] == [
    "python",
    "-m",
    "micle_jax.main",
    "--config=configs/cxr.py:demo,method=simclr",
  ]
  assert "--config.num_steps=4" in shlex.split(lines[1])
  assert "--config.seed=4" in shlex.split(lines[1])
  scratch = shlex.split(lines[4])
  assert "--config.optimizer.base_learning_rate=1.0" in scratch
  assert "--config.init_from=scratch" in scratch and "--config.init_seed=3" in scratch
  assert lines[-1].endswith("collect --root=" + str(tmp_path / "finetune") + " --plot")
  with s.unlocked():
    s.data_dir = "/elsewhere/tensorflow_datasets"  # one folder for every dataset of the study
  assert {p.config.dataset.data_dir for p in study.plan_pretraining(s)} == {s.data_dir}
  finetunings = study.plan_finetuning(s, pretrainings)
  assert {r.config.dataset.data_dir for r in finetunings} == {s.data_dir}
  assert {r.config.shift.nih.data_dir for r in finetunings} == {s.data_dir}
  with s.unlocked():
    s.pretrain_seeds = (1, 1)
  with pytest.raises(specs.ConfigError, match="none twice"):
    study.plan_pretraining(s)


def test_unequal_pretraining_budgets_stop_the_study_before_any_work(
  cxr_data_dir, nih_data_dir, tmp_path, monkeypatch
):
  s = _study(tmp_path, cxr_data_dir, nih_data_dir)
  with s.pretrain.overrides.unlocked():
    del s.pretrain.overrides["num_steps"]
    s.pretrain.overrides.num_epochs = 1
  runs = study.plan_pretraining(s)
  # A pass over MICLe's cases would be fewer steps than a pass over SimCLR's images; epochs
  # count images for both, so the budgets agree ...
  steps = study.check_equal_budgets(runs)
  assert steps["simclr"] == steps["micle"] > 0
  # ... and a budget that differs between the methods is refused.
  runs[1].config.unlock()
  runs[1].config.num_steps = steps["micle"] + 1
  with pytest.raises(ValueError, match="budgets differ between methods"):
    study.check_equal_budgets(runs)
  # The study itself refuses before it pretrains anything.
  monkeypatch.setattr(study, "plan_pretraining", lambda _: runs)
  wanted = rf"budgets differ between methods.*'micle': \({steps['micle'] + 1}, 8\)"
  with pytest.raises(ValueError, match=wanted):
    study.run_study(s)
  assert not (tmp_path / "pretrain").exists() and not (tmp_path / "finetune").exists()


def test_a_tiny_study_end_to_end(cxr_data_dir, nih_data_dir, tmp_path, capsys, monkeypatch):
  """Two pretraining seeds of one method and scratch: every level of the study, in little time
  (both methods' planning is tested above, and MICLe's pretraining in test_pretrain)."""
  s = _study(tmp_path, cxr_data_dir, nih_data_dir, pretrain_seeds=(0, 1), methods=("simclr",))
  rows, arms, diffs = study.run_study(s)
  out = capsys.readouterr().out
  for stage in (
    "pretrain simclr seed 0 (4 steps)",
    "pretrain simclr seed 1 (4 steps)",
    "fine-tune (4 runs)",
  ):
    assert f"[study] {stage}:" in out
  assert "[study] total:" in out and "Differences, init − baseline" in out
  for seed in (0, 1):
    summary = json.loads((tmp_path / f"pretrain/simclr/p{seed}/pretraining.json").read_text())
    assert summary["step"] == 4 and summary["views_seen"] == 2 * 4 * 8
    assert summary["seed"] == seed and summary["provenance"]["device_count"] == 8
    assert sorted(summary["probe"], key=int) == ["0", "2", "4"]
  main = [d for d in diffs if d["metric"] == "mean_auc"]
  assert {(d["eval"], d["init"], d["baseline"]) for d in main} == {
    (e, "simclr", "scratch") for e in ("in_distribution", "nih")
  }
  assert all(d["runs"] == d["baseline_runs"] == 2 and d["units"] == 2 for d in main)
  assert all(d["scope"] == "training runs and patients" for d in main)
  assert all(d["per_seed"].startswith("p0:") and " p1:" in d["per_seed"] for d in main)
  assert {r["init"] for r in rows} == {"scratch", "simclr"}
  assert {(a["init"], a["runs"], a["units"]) for a in arms} == {
    (i, 2, 2) for i in ("scratch", "simclr")
  }
  for name in ("results.csv", "arms.csv", "differences.csv"):
    assert (tmp_path / "finetune" / name).exists()
  scratch = json.loads((tmp_path / "finetune/scratch/p1/f0.5/s0/config.json").read_text())
  assert scratch["optimizer"]["base_learning_rate"] == 1.0 and scratch["init_seed"] == 1
  results = json.loads((tmp_path / "finetune/simclr/p1/f0.5/s0/results.json").read_text())
  assert results["pretraining"]["seed"] == 1 and results["init"]["step"] == 4
  assert results["provenance"]["convolution"]["convolution"] in ("native", "xla")
  # Rerun: every stage is found finished, nothing trains, the same tables come back.
  monkeypatch.setattr(
    study.sweep.finetune, "train_and_evaluate", lambda *a: pytest.fail("fine-tuned again")
  )
  loop_run = study.pretrain.loop.run

  def no_step(**kwargs):
    assert int(kwargs["state"].step) == kwargs["total_steps"], "pretrained again"
    return loop_run(**kwargs)

  monkeypatch.setattr(study.pretrain.loop, "run", no_step)
  rows_again, arms_again, diffs_again = study.run_study(s)
  assert (rows_again, arms_again, diffs_again) == (rows, arms, diffs)


def test_pair_policies_pretrain_on_every_view_at_one_budget_and_fine_tune_on_frontals(
  cxr_data_dir, nih_data_dir, tmp_path
):
  """MedAug-style: two views of one image, two images of one study, two images of one patient;
  all three on the same images (frontal and lateral), fine-tuning and evaluation frontal."""
  s = _study(tmp_path, cxr_data_dir, nih_data_dir, arg="demo,pairs")
  with s.unlocked():
    del s.pretrain.overrides["num_steps"]
    s.pretrain.overrides.num_epochs = 2
  pretrainings = study.plan_pretraining(s)
  assert [p.method for p in pretrainings] == ["simclr", "micle_study", "micle"]
  datasets = {p.method: p.config.dataset.name for p in pretrainings}
  assert datasets == {
    "simclr": "chexpert_micle/images",
    "micle_study": "chexpert_micle/studies",
    "micle": "chexpert_micle/patients",
  }
  assert {p.config.method for p in pretrainings} == {"simclr", "micle"}
  assert {p.config.dataset.views for p in pretrainings} == {"all"}
  assert {p.config.probe.views for p in pretrainings} == {"frontal"}  # scored as fine-tuning is
  assert f"{tmp_path}/pretrain/micle_study/p0" == pretrainings[1].workdir
  steps = study.check_equal_budgets(pretrainings)
  assert len(set(steps.values())) == 1
  frontal = _study(tmp_path, cxr_data_dir, nih_data_dir)
  with frontal.unlocked():
    del frontal.pretrain.overrides["num_steps"]
    frontal.pretrain.overrides.num_epochs = 2
  # The laterals are pretrained on: more images, more steps at the same epochs.
  assert steps["micle"] > study.check_equal_budgets(study.plan_pretraining(frontal))["micle"]
  runs = study.plan_finetuning(s, pretrainings)
  assert {r.init for r in runs} == {"scratch", "simclr", "micle_study", "micle"}
  config = study.load_config(s.finetune.config, s.finetune.arg)
  assert config.dataset.views == "frontal" and config.shift.nih.views == "frontal"
  assert differences.comparisons([r.init for r in runs])[-3:] == [
    ("micle", "simclr"),
    ("micle_study", "simclr"),
    ("micle_study", "micle"),
  ]
  with s.unlocked():
    s.method_args.micle_patient = "method=micle"
  with pytest.raises(specs.ConfigError, match="micle_patient"):
    study.plan_pretraining(s)


def test_a_pretraining_that_learned_nothing_is_flagged(cxr_data_dir, nih_data_dir, tmp_path):
  """A pretraining whose contrastive loss ends at or above chance (a diverged run) is named in
  the study's output: every arm fine-tuned from it measures the failure, not the method."""
  s = _study(tmp_path, cxr_data_dir, nih_data_dir)
  pretrainings = study.plan_pretraining(s)
  chance = {"chance_accuracy": 1 / 63, "chance_loss": 8.29}
  records = {
    "simclr": {"step": 512, "accuracy": 0.41, "loss": 5.1, **chance},
    "micle": {"step": 512, "accuracy": 0.02, "loss": 9.6, **chance},
  }
  for p in pretrainings:
    (tmp_path / p.workdir).mkdir(parents=True, exist_ok=True)
    path = tmp_path / p.workdir / "pretraining.json"
    path.write_text(json.dumps({"contrastive": records[p.method]}))
  lines = study.pretraining_health(pretrainings).splitlines()
  assert "learned nothing" not in lines[1] and "accuracy 0.410" in lines[1]
  assert lines[2].startswith("  micle") and lines[2].endswith("NOT BELOW CHANCE: learned nothing")


def test_each_pretrainings_last_probe_is_tabled_with_each_methods_mean(
  cxr_data_dir, nih_data_dir, tmp_path
):
  s = _study(tmp_path, cxr_data_dir, nih_data_dir)
  pretrainings = study.plan_pretraining(s)
  assert study.probe_summary(pretrainings) == ""  # nothing pretrained yet
  for i, p in enumerate(pretrainings):
    (tmp_path / p.workdir).mkdir(parents=True, exist_ok=True)
    probe = {"0": {"mean_auc": 0.5, "auc/Cardiomegaly": 0.5}}
    probe["512"] = {"mean_auc": 0.7 + 0.1 * i, "auc/Cardiomegaly": 0.6 - 0.1 * i}
    probe["100"] = {"mean_auc": 0.1, "auc/Cardiomegaly": 0.1}  # steps sort as numbers
    (tmp_path / p.workdir / "pretraining.json").write_text(json.dumps({"probe": probe}))
  lines = study.probe_summary(pretrainings).splitlines()
  assert lines[1].split() == ["method", "seed", "step", "mean_auc@0", "mean_auc", "Cardiomegaly"]
  assert lines[2].split() == [pretrainings[0].method, "p0", "512", "0.500", "0.700", "0.600"]
  means = {line.split()[0]: line.split()[2:] for line in lines if " mean " in line}
  assert means == {"simclr": ["0.700", "0.600"], "micle": ["0.800", "0.500"]}
  assert not any("NOT ABOVE" in line for line in lines)
  # A representation that ends where a random network starts (or below) is flagged.
  workdir = tmp_path / pretrainings[1].workdir
  probe["512"] = {"mean_auc": 0.49, "auc/Cardiomegaly": 0.7}
  (workdir / "pretraining.json").write_text(json.dumps({"probe": probe}))
  flagged = [line for line in study.probe_summary(pretrainings).splitlines() if "NOT ABOVE" in line]
  assert len(flagged) == 1 and flagged[0].split()[:2] == [pretrainings[1].method, "p0"]


def test_print_only_prints_every_command_and_runs_nothing(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[2]
  command = [sys.executable, "-m", "micle_jax.study", "--config=configs/study_cxr.py:demo"]
  command += [f"--config.root={tmp_path}/study", "--print_only"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 2 + 3 * 2 + 1  # 2 pretrainings, 3 inits × 2 fractions, the collection
  assert [shlex.split(line)[2] for line in lines] == (
    ["micle_jax.main"] * 2 + ["micle_jax.finetune"] * 6 + ["micle_jax.sweep"]
  )
  assert f"--workdir={tmp_path}/study/pretrain/micle/p0" in lines[1]
  assert "--config.label_fraction=0.05" in lines[2] and "base_learning_rate=1.0" in lines[2]
  assert not (tmp_path / "study").exists()

"""The study command: equal pretraining budgets, the planned runs and commands, and a tiny study
end to end (pretraining both methods, three inits fine-tuned, the paired-differences table)."""

import json
import shlex

import pytest
from ml_collections import config_dict

from configs import study_cxr
from micle_jax.tools import study, sweep_report


def _study(root, cxr_dir, nih_dir, **overrides):
  s = study_cxr.get_config("demo")
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


def test_the_demo_plan_has_equal_budgets_three_inits_and_the_scratch_override(
  cxr_data_dir, nih_data_dir, tmp_path
):
  s = _study(tmp_path, cxr_data_dir, nih_data_dir, fractions=(0.05, 1.0), seeds=(0, 1))
  pretrainings = study.plan_pretraining(s)
  assert [p.method for p in pretrainings] == ["simclr", "micle"]
  assert study.check_equal_budgets(pretrainings) == {"simclr": 4, "micle": 4}
  finetunings = study.plan_finetuning(s, pretrainings)
  assert [(r.init, r.label_fraction, r.seed) for r in finetunings][:2] == [
    ("scratch", 0.05, 0),
    ("scratch", 0.05, 1),
  ]
  assert len(finetunings) == 3 * 2 * 2
  lr = {r.init: r.config.optimizer.base_learning_rate for r in finetunings}
  assert lr["scratch"] == 1.0 and lr["micle"] == lr["simclr"] == 0.01
  assert {r.init_from for r in finetunings if r.init == "micle"} == {
    str(tmp_path / "pretrain/micle")
  }
  lines = study.commands(s, pretrainings, finetunings)
  assert len(lines) == 2 + 12 + 1
  assert shlex.split(lines[0])[:4] == [
    "python",
    "-m",
    "micle_jax.main",
    "--config=configs/cxr.py:demo,method=simclr",
  ]
  assert "--config.num_steps=4" in shlex.split(lines[1])
  scratch = shlex.split(lines[2])
  assert "--config.optimizer.base_learning_rate=1.0" in scratch
  assert "--config.init_from=scratch" in scratch
  assert lines[-1].endswith("collect --root=" + str(tmp_path / "finetune") + " --plot")


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


def test_a_tiny_study_end_to_end(cxr_data_dir, nih_data_dir, tmp_path, capsys):
  s = _study(tmp_path, cxr_data_dir, nih_data_dir)
  rows, diffs = study.run_study(s)
  out = capsys.readouterr().out
  for stage in ("pretrain simclr (4 steps)", "pretrain micle (4 steps)", "fine-tune (3 runs)"):
    assert f"[study] {stage}:" in out
  assert "[study] total:" in out and "Paired differences" in out
  for method in ("simclr", "micle"):
    summary = json.loads((tmp_path / "pretrain" / method / "pretraining.json").read_text())
    assert summary["step"] == 4 and summary["views_seen"] == 2 * 4 * 8
    assert sorted(summary["probe"], key=int) == ["0", "2", "4"]
  pairs = {(d["eval"], d["init"], d["baseline"]) for d in diffs if d["metric"] == "mean_auc"}
  assert pairs == {
    (e, i, b)
    for e in ("in_distribution", "nih")
    for i, b in (("simclr", "scratch"), ("micle", "scratch"), ("micle", "simclr"))
  }
  assert {r["init"] for r in rows} == {"scratch", "simclr", "micle"}
  assert (tmp_path / "finetune" / "differences.csv").exists()
  scratch = json.loads((tmp_path / "finetune/scratch/f0.5/s0/config.json").read_text())
  assert scratch["optimizer"]["base_learning_rate"] == 1.0
  # A second study in another folder prints the same tables: the study is deterministic.
  other = _study(tmp_path / "again", cxr_data_dir, nih_data_dir)
  rows_b, diffs_b = study.run_study(other)
  assert sweep_report.table(rows_b) == sweep_report.table(rows)
  assert sweep_report.differences_table(diffs_b) == sweep_report.differences_table(diffs)
  assert diffs_b == diffs
  # Rerun: every stage is found finished; the same table comes back.
  rows_again, diffs_again = study.run_study(s)
  assert rows_again == rows and diffs_again == diffs


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
  assert f"--workdir={tmp_path}/study/pretrain/micle" in lines[1]
  assert "--config.label_fraction=0.05" in lines[2] and "base_learning_rate=1.0" in lines[2]
  assert not (tmp_path / "study").exists()

r"""The label-efficiency study as one command: `python -m micle_jax.study --config=configs/study_cxr.py`.

Stages, each resumable (a finished stage is found and skipped, an unfinished one resumes):

1. **Pretrain** every method of `config.methods` (SimCLR, MICLe) once per seed of
   `config.pretrain_seeds`, from the same pretraining config, optionally from `config.init_from`
   (e.g. converted ImageNet weights). For each seed, the methods must run the same number of steps
   of the same batch; the study stops before any work if they would not.
2. **Fine-tune** every pretrained network, and scratch from as many initialisation seeds, at
   every label fraction and fine-tuning seed (`sweep.plan` / `sweep.run`, with
   `config.init_overrides` for inits that need their own hyperparameters).

`config.imagenet` (a folder `python -m micle_jax.import_torch` wrote from torchvision/timm
weights) runs the paper's design with that one key: the `supervised` arm fine-tunes from the
imported weights (the supervised ImageNet baseline), every pretraining starts from them
(ImageNet → SimCLR, ImageNet → MICLe; `config.imagenet_chain`), and every run, scratch's
included, takes the architecture they need (their conversion.json's `model` keys).
3. **Collect** `results.csv`, `arms.csv`, `differences.csv` (every arm and every difference with an
   interval over training runs and patients, `eval/differences.py`) and `label_efficiency.png`
   under `ROOT/finetune`, and print the tables.

The wall time of each stage is printed. `--print_only` prints, instead, the command of every
pretraining and fine-tuning run and of the collection, for a TPU fleet (the fine-tuning commands
need the pretraining runs to have finished).

Layout: `ROOT/pretrain/<method>/p<seed>/` (pretraining workdirs),
`ROOT/finetune/<init>/p<seed>/f<fraction>/s<seed>/` (for scratch, `p<seed>` is the seed of its
random initialisation).
"""

import dataclasses
import importlib.util
import shlex
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath

from micle_jax import app, pretrain, specs
from micle_jax.runtime import run_files, sharding
from micle_jax.tools import import_torch, sweep, sweep_plan

PRETRAIN_DIR = "pretrain"
FINETUNE_DIR = "finetune"
SUPERVISED = "supervised"  # the arm fine-tuned from `config.imagenet`


_REPO = epath.Path(__file__).parent.parent


def load_config(path: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file `path` (as `--config=path:arg` would give it).

  A relative path is looked up in the working directory, then in this repository.
  """
  file = epath.Path(path)
  if not file.exists() and not file.is_absolute() and (_REPO / path).exists():
    file = _REPO / path
  if not file.exists():
    raise FileNotFoundError(f"config file {path} not found")
  spec = importlib.util.spec_from_file_location(f"_study_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _with_arg(arg: str, extra: str) -> str:
  return ",".join(filter(None, (arg, extra)))


@dataclasses.dataclass(frozen=True)
class Pretraining:
  method: str
  seed: int
  config_arg: str  # e.g. "configs/cxr.py:demo,method=micle"
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str


def unit_label(seed: int) -> str:
  """A pretraining seed's folder and level-1 label, "p<seed>"."""
  return f"p{int(seed)}"


def imagenet_keys(study: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `model.*` keys that `config.imagenet`'s weights need ({} when it is not set)."""
  if not study.imagenet:
    return {}
  if study.init_from:
    raise specs.ConfigError(
      f"config.init_from={study.init_from} and config.imagenet={study.imagenet}: set one "
      "(config.imagenet already starts every pretraining from its weights)"
    )
  found = run_files.recorded_model(study.imagenet)
  if found is None or found[0].name != run_files.CONVERSION_FILE:
    raise specs.ConfigError(
      f"config.imagenet={study.imagenet}: no {run_files.CONVERSION_FILE} there; write the folder "
      "with python -m micle_jax.import_torch"
    )
  return {f"model.{k}": found[1][k] for k in import_torch.MODEL_KEYS if k in found[1]}


def _with_imagenet(overrides: dict[str, Any], keys: dict[str, Any], where: str) -> dict[str, Any]:
  """`overrides` and the imported weights' model keys, which they may not contradict."""
  for key, value in keys.items():
    if key in overrides and overrides[key] != value:
      raise specs.ConfigError(
        f"config.{where}{'' if where.startswith('init_overrides') else '.overrides'}.{key}="
        f"{overrides[key]!r}, but config.imagenet's weights need {value!r}"
      )
  return {**overrides, **keys}


def method_arg(study: ml_collections.ConfigDict, name: str) -> str:
  """The pretraining config argument of the arm `name`: `config.method_args[name]` (e.g. a pair
  policy, "method=micle,studies"), else "method=<name>"."""
  return (study.get("method_args") or {}).get(name, f"method={name}")


def plan_pretraining(study: ml_collections.ConfigDict) -> list[Pretraining]:
  """One pretraining per method and seed: the shared config, its overrides, the method, the seed
  and init_from."""
  if not study.pretrain_seeds or len(set(study.pretrain_seeds)) != len(study.pretrain_seeds):
    raise specs.ConfigError(
      f"config.pretrain_seeds={tuple(study.pretrain_seeds)}: need at least one, none twice"
    )
  unknown = sorted(set(study.get("method_args") or {}) - set(study.methods))
  if unknown:
    raise specs.ConfigError(
      f"config.method_args names {unknown}, not among config.methods={tuple(study.methods)}"
    )
  runs = []
  imagenet = imagenet_keys(study)
  for method in study.methods:
    arg = _with_arg(study.pretrain.arg, method_arg(study, method))
    for seed in study.pretrain_seeds:
      config = load_config(study.pretrain.config, arg)
      overrides = run_files.flatten(study.pretrain.overrides)
      for key in ("seed", "init_from"):
        if key in overrides:
          raise specs.ConfigError(
            f"config.pretrain.overrides.{key}: use config.{'pretrain_seeds' if key == 'seed' else key}"
          )
      overrides = _with_imagenet(overrides, imagenet, "pretrain")
      if imagenet and study.imagenet_chain:
        # The imported weights have no projection head: pretraining starts a new one.
        overrides = _with_imagenet(overrides, {"init_projection_head": False}, "pretrain")
      for key, value in overrides.items():
        sweep_plan.set_key(config, key, value, where=f"pretrain override {key}")
      if study.data_dir:
        overrides["dataset.data_dir"] = config.dataset.data_dir = study.data_dir
      # Set here, not by `set_key` (which keeps them for the sweep); in the printed commands too.
      overrides["seed"] = config.seed = int(seed)
      init_from = study.imagenet if imagenet and study.imagenet_chain else study.init_from
      if init_from:
        overrides["init_from"] = config.init_from = init_from
      specs.from_config(specs.PretrainSpec, config)  # fails now, naming the key
      workdir = str(epath.Path(study.root) / PRETRAIN_DIR / method / unit_label(seed))
      runs.append(
        Pretraining(method, int(seed), f"{study.pretrain.config}:{arg}", overrides, config, workdir)
      )
  return runs


def check_equal_budgets(runs: list[Pretraining]) -> dict[str, int]:
  """{method: total steps}; raises unless, for every seed, every method runs as many steps of the
  same batch."""
  budgets: dict[int, dict[str, tuple[int, int]]] = {}
  for run in runs:
    budget = pretrain.plan_budget(run.config, sharding.local_batch_size(run.config.batch_size))
    budgets.setdefault(run.seed, {})[run.method] = (budget.total_steps, run.config.batch_size)
  for seed, by_method in budgets.items():
    if len(set(by_method.values())) > 1:
      raise ValueError(
        f"pretraining budgets differ between methods at seed {seed} (steps, batch): {by_method}"
      )
  return {run.method: budgets[run.seed][run.method][0] for run in runs}


def plan_finetuning(study, pretrainings: list[Pretraining]) -> list[sweep.Run]:
  config = load_config(study.finetune.config, study.finetune.arg)
  for key, value in finetune_overrides(study, config).items():
    sweep_plan.set_key(config, key, value, where=f"finetune override {key}")
  inits: dict[str, list[sweep_plan.Start]] = {}
  if study.scratch:
    inits[sweep.SCRATCH] = [
      sweep_plan.Start(sweep.SCRATCH, unit_label(seed), init_seed=int(seed))
      for seed in study.pretrain_seeds
    ]
  if study.imagenet:
    inits[SUPERVISED] = [sweep_plan.Start(study.imagenet, "imagenet")]
  for p in pretrainings:
    inits.setdefault(p.method, []).append(sweep_plan.Start(p.workdir, unit_label(p.seed)))
  init_overrides = {
    name: run_files.flatten(values)
    for name, values in study.init_overrides.items()
    if name in inits
  }
  imagenet = imagenet_keys(study)
  for name, values in init_overrides.items():  # refuses an override contradicting the weights
    _with_imagenet(values, imagenet, f"init_overrides.{name}")
  if study.imagenet and config.model.proj_layers_kept > 0:
    raise specs.ConfigError(
      f"config.finetune model.proj_layers_kept={config.model.proj_layers_kept}: the supervised "
      f"arm fine-tunes from config.imagenet's weights, which have no projection head; keep 0"
    )
  return sweep.plan(
    config,
    epath.Path(study.root) / FINETUNE_DIR,
    inits=inits,
    fractions=sweep.parse_fractions([str(f) for f in study.fractions]),
    seeds=sweep.parse_seeds([str(s) for s in study.seeds]),
    init_overrides=init_overrides,
  )


def finetune_overrides(study, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The study's fine-tuning overrides, with `data_dir` (when set) for the training data and
  every shift dataset, and the model keys of `config.imagenet`'s weights."""
  overrides = _with_imagenet(
    run_files.flatten(study.finetune.overrides), imagenet_keys(study), "finetune"
  )
  if study.data_dir:
    overrides["dataset.data_dir"] = study.data_dir
    for key in config.shift:
      overrides[f"shift.{key}.data_dir"] = study.data_dir
  return overrides


def commands(study, pretrainings, finetunings, python: str = "python") -> list[str]:
  """Every command of the study, in order: pretrainings, fine-tunings, collection."""
  lines = []
  for p in pretrainings:
    args = [python, "-m", "micle_jax.main", f"--config={p.config_arg}", f"--workdir={p.workdir}"]
    args += [f"--config.{k}={sweep_plan.flag_value(v)}" for k, v in p.overrides.items()]
    lines.append(shlex.join(args))
  finetune_arg = f"{study.finetune.config}:{study.finetune.arg}".rstrip(":")
  overrides = finetune_overrides(study, load_config(study.finetune.config, study.finetune.arg))
  lines += [sweep.command(run, finetune_arg, overrides, python=python) for run in finetunings]
  root = epath.Path(study.root) / FINETUNE_DIR
  lines.append(shlex.join([python, "-m", "micle_jax.sweep", "collect", f"--root={root}", "--plot"]))
  return lines


class _Stopwatch:
  def __init__(self):
    self.stages: list[tuple[str, float]] = []

  def run(self, name: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    self.stages.append((name, time.perf_counter() - start))
    print(f"[study] {name}: {self.stages[-1][1]:.0f} s", flush=True)
    return result


def _record(p: Pretraining) -> dict[str, Any]:
  """A pretraining's pretraining.json ({} before it ran)."""
  return run_files.read_json_if_exists(epath.Path(p.workdir) / run_files.PRETRAINING_FILE) or {}


def pretraining_health(pretrainings: list[Pretraining]) -> str:
  """Each pretraining's contrastive accuracy and loss at its end beside chance (its
  pretraining.json); one whose loss is not below chance learned nothing (e.g. it diverged), and
  every arm fine-tuned from it measures that, not the method: flagged."""
  lines = ["Pretraining at its end (contrastive accuracy and loss over the last logged steps):"]
  for p in pretrainings:
    c = _record(p).get("contrastive")
    name = f"{p.method:<12} {unit_label(p.seed):<4}"
    if not c or c.get("loss") is None:
      lines.append(f"  {name} not recorded")
      continue
    flag = "  NOT BELOW CHANCE: learned nothing" if c["loss"] >= c["chance_loss"] else ""
    lines.append(
      f"  {name} step {c['step']:>6}  accuracy {c['accuracy']:.3f} (chance "
      f"{c['chance_accuracy']:.3f})  loss {c['loss']:.2f} (chance {c['chance_loss']:.2f}){flag}"
    )
  return "\n".join(lines)


def probe_summary(pretrainings: list[Pretraining]) -> str:
  """Each pretraining's kNN probe at its last scored step (pretraining.json: every metric, e.g.
  the AUC of each label) beside its first metric at step 0, then each method's mean over its
  pretraining seeds; "" when none was probed. What each representation holds of each label,
  before any fine-tuning. A run whose first metric ended at or below its value at step 0 (the
  architecture at initialisation) is flagged: its contrastive task may have trained, but on a
  cue the labels do not share, and every arm fine-tuned from it measures that."""
  last = {}
  for p in pretrainings:
    history = _record(p).get("probe") or {}
    if history:
      step = max(history, key=int)
      last[(p.method, p.seed)] = (int(step), history[step], history.get("0"))
  if not last:
    return ""
  metrics = list(next(iter(last.values()))[1])
  main = metrics[0]
  header = ["method", "seed", "step", f"{main}@0", *(m.removeprefix("auc/") for m in metrics)]
  rows, flags = [], []
  for (method, seed), (step, scores, start) in last.items():
    at_start = (start or {}).get(main, float("nan"))
    values = [f"{scores.get(m, float('nan')):.3f}" for m in metrics]
    rows.append([method, unit_label(seed), str(step), f"{at_start:.3f}", *values])
    flags.append(
      "  NOT ABOVE INITIALISATION" if step > 0 and scores.get(main, np.nan) <= at_start else ""
    )
  for method in dict.fromkeys(method for method, _ in last):
    mine = [scores for (m, _), (_, scores, _) in last.items() if m == method]
    means = [np.mean([s.get(m, np.nan) for s in mine]) for m in metrics]
    rows.append([method, "mean", "", "", *(f"{v:.3f}" for v in means)])
    flags.append("")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["kNN probe of each pretraining at its last step (frozen features, leave-patient-out):"]
  lines += [
    "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + flag
    for r, flag in zip([header, *rows], ["", *flags], strict=True)
  ]
  return "\n".join(line.rstrip() for line in lines)


def collect(study) -> tuple[list[dict], list[dict], list[dict]]:
  """results.csv, arms.csv, differences.csv and the plot under ROOT/finetune; prints the
  tables."""
  root = epath.Path(study.root) / FINETUNE_DIR
  return sweep.report(root, num_samples=study.bootstrap_samples, plot=True)


def run_study(study: ml_collections.ConfigDict) -> tuple[list[dict], list[dict], list[dict]]:
  """Pretrains, fine-tunes and collects as `study` says; returns (results rows, arm rows,
  differences)."""
  if study.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", str(epath.Path(study.root) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  pretrainings = plan_pretraining(study)
  finetunings = plan_finetuning(study, pretrainings)  # validated before anything trains
  steps = check_equal_budgets(pretrainings)
  logging.info("Pretraining budgets (steps): %s", steps)
  clock = _Stopwatch()
  for p in pretrainings:
    name = f"pretrain {p.method} seed {p.seed} ({steps[p.method]} steps)"
    clock.run(name, pretrain.train_and_evaluate, p.config, p.workdir)
  health = "\n".join(filter(None, [pretraining_health(pretrainings), probe_summary(pretrainings)]))
  print(health, flush=True)
  clock.run(f"fine-tune ({len(finetunings)} runs)", sweep.run, finetunings)
  out = clock.run("collect", collect, study)
  print(health)
  total = sum(seconds for _, seconds in clock.stages)
  print(f"[study] total: {total:.0f} s ({total / 60:.1f} min)")
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  app.config_flag("Study config (configs/study_*.py).")
  flags.DEFINE_bool("print_only", False, "Print every command instead of running them.")


def main() -> None:
  study = FLAGS.config
  if FLAGS.print_only:
    pretrainings = plan_pretraining(study)
    for line in commands(study, pretrainings, plan_finetuning(study, pretrainings)):
      print(line)
    return
  app.start_devices(load_config(study.pretrain.config, study.pretrain.arg).batch_size)
  run_study(study)


if __name__ == "__main__":
  app.run(main, define_flags)

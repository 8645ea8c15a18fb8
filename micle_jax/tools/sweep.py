r"""Label-efficiency sweeps of fine-tuning runs, and one CSV of all their results.

Run every (init, label fraction, seed) one after another in this process (resumable: a run whose
`results.json` exists is skipped, and an unfinished one resumes from its latest checkpoint):

  python -m micle_jax.sweep run --config=configs/finetune_cxr.py --root=gs://BUCKET/sweep_cxr \
      --fractions=0.1,0.5,1.0 --seeds=0,1 \
      --inits=scratch,simclr=gs://BUCKET/cxr_simclr,micle=gs://BUCKET/cxr_micle

Each run's workdir is `ROOT/<init name>/f<fraction>/s<seed>`. Add `--print_only` to print one
`python -m micle_jax.finetune ...` command per run instead (one job each on a TPU fleet); other
`--config.key=value` overrides are applied to every run, and passed on in the printed commands.

A run whose `results.json` exists is skipped only if its `config.json` and `data.json` match the
planned run and the data it would read (`run_files.check_reusable`), and its init checkpoint is
still the step it started from; otherwise the sweep stops, naming what changed, rather than
reporting a stale result as this run's.

Then gather every `results.json` under the root (one row per run, eval dataset and metric), each
init's value per label fraction and evaluation, and the differences between inits
(`differences.py`: every init against scratch, micle against simclr), with intervals that resample
the training runs and the patients:

  python -m micle_jax.sweep collect --root=gs://BUCKET/sweep_cxr --out=results.csv

writes `results.csv`, `arms.csv` and `differences.csv` beside it and prints the tables. A warning
names the environment keys (versions, devices, convolution path, ...) in which the runs differ.
`notebooks/label_efficiency.ipynb` and `notebooks/distribution_shift.ipynb` plot those CSVs.
"""

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from micle_jax import app, finetune
from micle_jax.data import fingerprint
from micle_jax.eval import differences
from micle_jax.runtime import checkpoint, provenance, run_files
from micle_jax.tools import sweep_report
from micle_jax.tools.sweep_plan import (  # noqa: F401 (the sweep's public names)
  SCRATCH,
  SWEPT_KEYS,
  Run,
  command,
  parse_fractions,
  parse_init_overrides,
  parse_inits,
  parse_seeds,
  plan,
  run_workdir,
)

CSV_COLUMNS = (
  "init",
  "init_from",
  "mode",
  "task",
  "label_fraction",
  "seed",
  "eval",
  "dataset",
  "metric",
  "value",
  "ci_low",
  "ci_high",
  "num_units",
  "num_train_patients",
  "train_steps",
  "train_images_seen",
  "pretrain_steps",
  "pretrain_views_seen",
  "workdir",
)
DIFFERENCES_FILE = "differences.csv"
ARMS_FILE = "arms.csv"


def run(runs: Sequence[Run]) -> list[Run]:
  """Trains and evaluates each run in turn, skipping those with a results.json; returns the rest.

  A run that fails stops the sweep; running it again skips what finished and resumes the failed
  run from its latest checkpoint.
  """
  trained = []
  for i, run_ in enumerate(runs):
    if (epath.Path(run_.workdir) / finetune.RESULTS_FILE).exists():
      check_results_current(run_)
      logging.info("[%d/%d] %s: results exist, skipped", i + 1, len(runs), run_.workdir)
      continue
    logging.info("[%d/%d] %s: fine-tuning from %s", i + 1, len(runs), run_.workdir, run_.init_from)
    finetune.train_and_evaluate(run_.config, run_.workdir)
    trained.append(run_)
  return trained


def check_results_current(run_: Run) -> None:
  """Raises ValueError unless `run_`'s existing results come from this very run: the same config,
  and the init checkpoint still at the step the run started from."""
  workdir = epath.Path(run_.workdir)
  run_files.check_reusable(
    workdir,
    run_.config,
    what="skip it (results exist)",
    allow_length_change=False,
    data=fingerprint.finetune_data(finetune.validate(run_.config)),
  )
  results = run_files.read_json(workdir / finetune.RESULTS_FILE)
  recorded = (results.get("init") or {}).get("step")
  if run_.init_from != SCRATCH and recorded is not None:
    step = run_.config.init_step
    current = step if step >= 0 else checkpoint.latest_step(run_.init_from)
    if current != recorded:
      raise ValueError(
        f"{workdir}: its results were fine-tuned from {run_.init_from} step {recorded}, which "
        f"is now at step {current}; delete the run (or use another root) to redo it"
      )


def _find_results(root: epath.Path) -> Iterator[epath.Path]:
  """Every results.json under `root`, not descending into run workdirs or checkpoints."""
  stack = [root]
  while stack:
    directory = stack.pop()
    children = sorted(directory.iterdir(), key=lambda p: p.name, reverse=True)
    names = {child.name for child in children}
    if finetune.RESULTS_FILE in names:
      yield directory / finetune.RESULTS_FILE
      continue
    if "config.json" in names:  # An unfinished run.
      continue
    stack += [c for c in children if c.name != checkpoint.CHECKPOINT_DIR and c.is_dir()]


def _rows(results: dict[str, Any], init: str, workdir: str) -> list[dict[str, Any]]:
  pretraining = results.get("pretraining") or {}
  rows = []
  for eval_name, result in results["eval"].items():
    for metric, m in result["metrics"].items():
      rows.append(
        {
          "init": init,
          "init_from": results["init_from"],
          "mode": results["mode"],
          "task": results["task"],
          "label_fraction": results["label_fraction"],
          "seed": results["seed"],
          "eval": eval_name,
          "dataset": result["dataset"],
          "metric": metric,
          "value": m["value"],
          "ci_low": m["ci_low"],
          "ci_high": m["ci_high"],
          "num_units": m["num_units"],
          "num_train_patients": results["num_train_patients"],
          "train_steps": results["step"],
          "train_images_seen": results.get("train_images_seen"),
          "pretrain_steps": pretraining.get("step"),
          "pretrain_views_seen": pretraining.get("views_seen"),
          "workdir": workdir,
        }
      )
  return rows


def collect_runs(root: epath.PathLike) -> list[dict[str, Any]]:
  """{"init", "results", "workdir"} of every finished run under `root` (local or gs://).

  `init` is the run's first path component under `root`. Runs are ordered by init, label
  fraction, seed and workdir.
  """
  root = epath.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"sweep root {root} is not a directory")
  runs = []
  for path in _find_results(root):
    results = json.loads(path.read_text())
    parts = path.parent.relative_to(root).parts
    init = parts[0] if parts else root.name
    runs.append({"init": init, "results": results, "workdir": str(path.parent)})
  runs.sort(
    key=lambda r: (r["init"], r["results"]["label_fraction"], r["results"]["seed"], r["workdir"])
  )
  logging.info("Collected %d runs under %s", len(runs), root)
  return runs


def collect(root: epath.PathLike) -> list[dict[str, Any]]:
  """One row (CSV_COLUMNS) per run, eval dataset and metric found under `root` (local or gs://).

  Rows are ordered as `collect_runs`, and within a run as in its results.json. Undefined metrics
  (null in results.json) are None.
  """
  return [row for r in collect_runs(root) for row in _rows(r["results"], r["init"], r["workdir"])]


def write_csv(
  rows: Sequence[Mapping[str, Any]],
  path: epath.PathLike,
  columns: Sequence[str] = CSV_COLUMNS,
) -> None:
  """Writes `rows` with the `columns` header to `path` (local or gs://); None -> empty cell."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row[k] is None else row[k] for k in columns})
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(buffer.getvalue())


def report(
  root: epath.PathLike, *, out: epath.PathLike | None = None, num_samples: int, plot: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
  """Collects `root`: writes results.csv (or `out`; one row per run), arms.csv and
  differences.csv beside it (`differences.compare`) and, with `plot`, label_efficiency.png;
  warns when the runs come from different environments; prints both tables; returns (rows, arm
  rows, differences)."""
  out = epath.Path(out or epath.Path(root) / "results.csv")
  runs = collect_runs(root)
  rows = [row for r in runs for row in _rows(r["results"], r["init"], r["workdir"])]
  write_csv(rows, out)
  provenance.warn_if_mixed([r["results"].get("provenance") for r in runs], what=str(root))
  arms, diffs = differences.compare(runs, num_samples=num_samples)
  write_csv(arms, out.parent / ARMS_FILE, differences.ARM_COLUMNS)
  write_csv(diffs, out.parent / DIFFERENCES_FILE, differences.COLUMNS)
  logging.info(
    "Wrote %d rows to %s, %d arms and %d differences beside it", len(rows), out, len(arms),
    len(diffs),
  )  # fmt: skip
  print(sweep_report.table(arms))
  print()
  print(sweep_report.differences_table(diffs))
  if plot:
    png = out.parent / "label_efficiency.png"
    try:
      sweep_report.plot_label_efficiency(arms, png)
      print(f"Label-efficiency plot: {png}")
    except ImportError:  # the tables and CSVs above are the results; the plot is a convenience
      logging.warning("matplotlib is not installed (requirements.txt has it): no %s", png)
  return rows, arms, diffs


FLAGS = flags.FLAGS
SUBCOMMANDS = ("run", "collect")


def define_flags(flag_values: flags.FlagValues = FLAGS, sys_argv: list[str] | None = None) -> None:
  """Defines the command line flags (`sys_argv`: the argv to find `--config.*` overrides in)."""
  fv = dict(flag_values=flag_values)
  app.config_flag(
    "Fine-tuning config (configs/finetune_*.py[:arg]).", required=False, sys_argv=sys_argv, **fv
  )
  flags.DEFINE_string("root", None, "Sweep root: runs go to ROOT/<init>/f<fraction>/s<seed>.", **fv)
  flags.DEFINE_list("fractions", ["1.0"], "Label fractions, e.g. 0.1,0.5,1.0.", **fv)
  flags.DEFINE_list("seeds", ["0"], "Seeds (also pick the label-fraction subset), e.g. 0,1.", **fv)
  flags.DEFINE_list("inits", [SCRATCH], "scratch and/or NAME=PATH (pretraining weights).", **fv)
  flags.DEFINE_list(
    "init_overrides",
    [],
    "INIT:KEY=VALUE config overrides for one init's runs, e.g. "
    "scratch:optimizer.base_learning_rate=1.0 (comma-separated).",
    **fv,
  )
  flags.DEFINE_bool("print_only", False, "run: print a finetune command per run, train none.", **fv)
  flags.DEFINE_string("out", None, "collect: the CSV to write (default ROOT/results.csv).", **fv)
  flags.DEFINE_bool("plot", False, "collect: also save label_efficiency.png next to the CSV.", **fv)
  flags.DEFINE_integer(
    "bootstrap_samples", 1000, "collect: draws of the paired bootstrap of differences.", **fv
  )
  flags.mark_flag_as_required("root", flag_values=flag_values)


def _main_run() -> None:
  if FLAGS.config is None:
    raise app.UsageError("run needs --config")
  overrides = config_flags.get_override_values(FLAGS["config"])
  clash = sorted(set(overrides) & set(SWEPT_KEYS))
  if clash:
    raise app.UsageError(f"--config.{clash[0]} is swept: use --inits/--fractions/--seeds")
  runs = plan(
    FLAGS.config,
    FLAGS.root,
    inits=parse_inits(FLAGS.inits),
    fractions=parse_fractions(FLAGS.fractions),
    seeds=parse_seeds(FLAGS.seeds),
    init_overrides=parse_init_overrides(FLAGS.init_overrides),
  )
  if FLAGS.print_only:
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    for run_ in runs:
      print(command(run_, config_arg, overrides))
    return
  app.start_devices(FLAGS.config.batch_size)
  trained = run(runs)
  logging.info("Sweep done: %d runs trained, %d skipped", len(trained), len(runs) - len(trained))


def main(subcommand: str) -> None:
  if subcommand == "run":
    _main_run()
    return
  report(FLAGS.root, out=FLAGS.out, num_samples=FLAGS.bootstrap_samples, plot=FLAGS.plot)


if __name__ == "__main__":
  app.run(main, define_flags, subcommands=SUBCOMMANDS)

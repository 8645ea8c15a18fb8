"""Resume survives a damaged or half-written checkpoint: it sets the bad step aside, says so in one
line, resumes from the newest readable one and ends bit-identical to an uninterrupted run."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import test_pretrain
from flax import traverse_util

from configs import cxr
from micle_jax import pretrain
from micle_jax.runtime import checkpoint, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir, **overrides):
  """test_pretrain's tiny pretraining (6 steps, checkpoints every 2), without the probe."""
  return test_pretrain._config(data_dir, **{"probe.dataset": "", **overrides})


def _flags(config) -> list[str]:
  """The `--config.key=value` flags that turn `configs/cxr.py:demo` into `config`."""
  demo = traverse_util.flatten_dict(cxr.get_config("demo").to_dict(), sep=".")
  wanted = traverse_util.flatten_dict(config.to_dict(), sep=".")
  return [f"--config.{k}={v}" for k, v in wanted.items() if demo.get(k) != v]


def _assert_same_state(a, b):
  for part in ("params", "batch_stats", "opt_state"):
    for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(getattr(a, part)),
      jax.tree_util.tree_leaves(getattr(b, part)),
      strict=True,
    ):
      np.testing.assert_array_equal(
        np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
      )


def _steps(workdir) -> list[str]:
  return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(cxr_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  state = jax.device_get(pretrain.train_and_evaluate(_config(cxr_data_dir), str(workdir)))
  assert _steps(workdir) == ["2", "4", "6"]
  return workdir, state


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files, f"no OCDBT data files under {step_dir}"
  return files


def _truncate(step_dir):
  for f in _data_files(step_dir):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete(step_dir):
  for f in _data_files(step_dir):
    f.unlink()


def _garble(step_dir):
  rng = np.random.default_rng(0)
  for f in _data_files(step_dir):
    f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def _garble_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{not json")


@pytest.mark.parametrize("damage", [_truncate, _delete, _garble, _garble_metadata])
def test_a_damaged_newest_step_of_any_kind_is_set_aside_and_the_previous_one_read(
  uninterrupted, tmp_path, damage, caplog
):
  source, expected = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  damage(workdir / "checkpoints" / "6")
  target = jax.device_put(
    checkpoint.state_to_tree(expected), sharding.replicated(sharding.create_mesh())
  )
  mngr = checkpoint.manager(workdir, max_to_keep=10)
  step, tree = checkpoint.restore_newest_readable(mngr, target)
  mngr.close()
  assert step == 4 and int(tree["step"]) == 4
  assert _steps(workdir) == ["2", "4", "6.damaged"]  # kept on disk, out of the way
  params, _, _ = checkpoint.load_weights(workdir / "checkpoints" / "4")
  for a, b in zip(
    jax.tree_util.tree_leaves(tree["params"]), jax.tree_util.tree_leaves(params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  skipped = [r.getMessage() for r in caplog.records if "Skipped step 6" in r.getMessage()]
  assert len(skipped) == 1 and "set aside as" in skipped[0] and "6.damaged" in skipped[0]


def test_a_run_resumed_past_a_damaged_step_ends_bit_identical(
  uninterrupted, cxr_data_dir, tmp_path, caplog
):
  source, expected = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  _truncate(workdir / "checkpoints" / "6")
  state = jax.device_get(pretrain.train_and_evaluate(_config(cxr_data_dir), str(workdir)))
  assert int(state.step) == 6
  _assert_same_state(state, expected)  # fell back to step 4, trained 5 and 6 again
  assert _steps(workdir) == ["2", "4", "6", "6.damaged"]  # kept aside, and 6 written anew
  skipped = [r.getMessage() for r in caplog.records if "Skipped step 6" in r.getMessage()]
  assert len(skipped) == 1 and "set aside as" in skipped[0] and "6.damaged" in skipped[0]
  assert checkpoint.load_weights(workdir)[2] == 6


def test_when_no_step_is_readable_the_run_stops_naming_each_and_renames_nothing(
  uninterrupted, cxr_data_dir, tmp_path
):
  source, _ = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  for step in ("2", "4", "6"):
    _truncate(workdir / "checkpoints" / step)
  with pytest.raises(checkpoint.UnreadableCheckpointError) as error:
    pretrain.train_and_evaluate(_config(cxr_data_dir), str(workdir))
  message = str(error.value)
  assert "\n" not in message and "no checkpoint in" in message
  assert message.index("step 6:") < message.index("step 4:") < message.index("step 2:")
  assert _steps(workdir) == ["2", "4", "6"]  # a rerun fails the same way, never starts afresh
  # The command line: one line on stderr and a non-zero exit status, not a traceback.
  script = textwrap.dedent(
    f"""
    import sys
    sys.argv = ["main", "--config={REPO}/configs/cxr.py:demo", "--workdir={workdir}",
                *{_flags(_config(cxr_data_dir))!r}]
    import runpy
    runpy.run_module("micle_jax.main", run_name="__main__")
    """
  )
  env = dict(os.environ)  # the suite's XLA_FLAGS (conftest): the same compilation as in-process
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
  assert len(errors) == 1, lines[-20:]
  assert lines[errors[0]].startswith("error: no checkpoint in") and "step 2:" in lines[errors[0]]
  after = lines[errors[0] + 1 :]  # at most log lines of the shutdown; no traceback, no echo
  assert all(line[:1] in "IW" and line[1:5].isdigit() for line in after), after
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr


def test_a_save_killed_in_flight_resumes_from_the_previous_committed_step(
  uninterrupted, cxr_data_dir, tmp_path
):
  _, expected = uninterrupted
  workdir = tmp_path / "run"
  script = textwrap.dedent(
    f"""
    import os, signal, sys
    sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
    import jax
    jax.config.update("jax_compilation_cache_dir", {jax.config.jax_compilation_cache_dir!r})
    from micle_jax import pretrain
    from micle_jax.runtime import checkpoint, sharding
    import test_checkpoint_recovery as t

    save = checkpoint.save

    def save_then_die(mngr, step, tree, **kwargs):
      out = save(mngr, step, tree, **kwargs)  # asynchronous: its commit is still in flight
      if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
      return out

    checkpoint.save = save_then_die
    pretrain.train_and_evaluate(t._config({cxr_data_dir!r}), {str(workdir)!r})
    """
  )
  env = dict(os.environ)  # the suite's XLA_FLAGS (conftest): the same compilation as in-process
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == -9, result.stderr[-3000:]
  left = _steps(workdir)
  assert "2" in left and "4" not in left, left  # killed before step 4 committed
  state = jax.device_get(pretrain.train_and_evaluate(_config(cxr_data_dir), str(workdir)))
  _assert_same_state(state, expected)
  assert _steps(workdir) == ["2", "4", "6"]  # the half-written save is gone, not a step


def test_init_from_a_damaged_checkpoint_fails_naming_it(uninterrupted, cxr_data_dir, tmp_path):
  source, _ = uninterrupted
  damaged = tmp_path / "pretrained"
  shutil.copytree(source, damaged)
  _truncate(damaged / "checkpoints" / "6")
  with pytest.raises(
    ValueError, match=r"init_from=.*pretrained: checkpoint step 6 in .* cannot be read"
  ):
    checkpoint.load_weights(damaged)
  config = _config(cxr_data_dir, init_from=str(damaged))
  with pytest.raises(ValueError, match="checkpoint step 6"):
    pretrain.train_and_evaluate(config, str(tmp_path / "run"))
  assert _steps(damaged) == ["2", "4", "6"]  # never falls back to step 4 of a named checkpoint

"""Tests of the TPU launch scripts, run with DRY_RUN=1: no gcloud, no network, no cloud project.

Every printed line must be one shell command; the tests split it with `shlex` (so quoting is
checked too) and look at the argument lists.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TPU_SH = _REPO / "launch" / "tpu.sh"
_SETTINGS = {"TPU_NAME": "test-tpu", "ZONE": "us-central2-b", "PROJECT": "test-project"}
_WORKDIR = "gs://test-bucket/runs/cxr"
_SUBCOMMANDS = ["create", "setup", "run", "logs", "ssh", "status", "stop", "delete"]


@pytest.fixture
def env(tmp_path: pathlib.Path) -> dict[str, str]:
  """A clean environment where any real gcloud call fails loudly."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  gcloud = fake_bin / "gcloud"
  gcloud.write_text("#!/bin/sh\necho 'gcloud must not run under DRY_RUN' >&2\nexit 99\n")
  gcloud.chmod(0o755)
  return {
    "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
    "HOME": str(tmp_path),
    "TMPDIR": str(tmp_path),
    "DRY_RUN": "1",
    **_SETTINGS,
  }


def _launch(env: dict[str, str], *args: str, stdin: str = "", **settings: str):
  return subprocess.run(
    ["bash", str(_TPU_SH), *args],
    env={**env, **settings},
    input=stdin,
    capture_output=True,
    text=True,
    timeout=30,
  )


def _commands(env: dict[str, str], *args: str, stdin: str = "", **settings: str) -> list[list[str]]:
  """Runs a subcommand that must succeed; returns its printed commands as argument lists."""
  result = _launch(env, *args, stdin=stdin, **settings)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(command: list[str], name: str) -> str:
  values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


def _assert_located(command: list[str]) -> None:
  assert _flag(command, "zone") == "us-central2-b"
  assert _flag(command, "project") == "test-project"


def test_help_lists_every_command(env):
  result = _launch(env, "help")
  assert result.returncode == 0
  for word in [*_SUBCOMMANDS, "DRY_RUN", "CONFIG"]:
    assert word in result.stdout


def test_unknown_or_missing_command_prints_usage_and_fails(env):
  for args in [("launch",), ()]:
    result = _launch(env, *args)
    assert result.returncode != 0
    assert "Usage:" in result.stderr and result.stdout == ""


def test_create_tpu_vm(env):
  [command] = _commands(env, "create", ACCELERATOR_TYPE="v4-8")
  assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "test-tpu"]
  _assert_located(command)
  assert _flag(command, "accelerator-type") == "v4-8"
  assert _flag(command, "version") == "tpu-ubuntu2204-base"
  assert "--spot" not in command and "--preemptible" not in command


@pytest.mark.parametrize("setting, flag", [("SPOT", "--spot"), ("PREEMPTIBLE", "--preemptible")])
def test_create_spot_or_preemptible_tpu_vm(env, setting, flag):
  [command] = _commands(env, "create", ACCELERATOR_TYPE="v4-8", **{setting: "1"})
  assert command[4] == "create" and flag in command


def test_create_queued_spot_resource(env):
  [command] = _commands(
    env,
    "create",
    ACCELERATOR_TYPE="v5litepod-16",
    QUEUED="1",
    SPOT="1",
    VALID_UNTIL_DURATION="6h",
  )
  assert command[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "test-tpu"]
  _assert_located(command)
  assert _flag(command, "node-id") == "test-tpu"
  assert _flag(command, "accelerator-type") == "v5litepod-16"
  assert _flag(command, "runtime-version") == "v2-alpha-tpuv5-lite"
  assert _flag(command, "valid-until-duration") == "6h"
  assert "--spot" in command


@pytest.mark.parametrize(
  "accelerator, runtime",
  [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_default_runtime_per_generation(env, accelerator, runtime):
  [command] = _commands(env, "create", ACCELERATOR_TYPE=accelerator)
  assert _flag(command, "version") == runtime


def test_runtime_version_setting_wins(env):
  [command] = _commands(env, "create", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="v2-alpha-tpuv4")
  assert _flag(command, "version") == "v2-alpha-tpuv4"


@pytest.mark.parametrize(
  "settings, message",
  [
    ({}, "ACCELERATOR_TYPE"),
    ({"ACCELERATOR_TYPE": "v9-8"}, "RUNTIME_VERSION"),
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "maybe"}, "SPOT=maybe"),
    ({"ACCELERATOR_TYPE": "v4-8", "SPOT": "1", "PREEMPTIBLE": "1"}, "PREEMPTIBLE"),
    ({"ACCELERATOR_TYPE": "v4-8", "QUEUED": "1", "PREEMPTIBLE": "1"}, "QUEUED=1"),
    ({"ACCELERATOR_TYPE": "v4-8", "VALID_UNTIL_DURATION": "1h"}, "QUEUED=1"),
  ],
)
def test_create_rejects_bad_settings(env, settings, message):
  result = _launch(env, "create", **settings)
  assert result.returncode != 0 and result.stdout == ""
  assert message in result.stderr


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "PROJECT"])
@pytest.mark.parametrize("subcommand", _SUBCOMMANDS)
def test_missing_required_setting_is_named(env, subcommand, missing):
  del env[missing]
  result = _launch(env, subcommand, YES="1", ACCELERATOR_TYPE="v4-8", GCS_WORKDIR=_WORKDIR)
  assert result.returncode != 0 and result.stdout == ""
  assert missing in result.stderr


def _remote_command(command: list[str]) -> str:
  assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], command
  assert command[5] == "test-tpu"
  _assert_located(command)
  return _flag(command, "command")


def test_setup_ships_git_archive_and_installs_on_all_workers(env):
  archive, scp, ssh = _commands(env, "setup")
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  tarball = _flag(archive, "output")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "test-tpu:micle_jax.tar.gz"]
  assert _flag(scp, "worker") == "all"
  _assert_located(scp)
  assert _flag(ssh, "worker") == "all"
  remote = _remote_command(ssh)
  steps = [
    "tar -xzf micle_jax.tar.gz -C micle_jax",
    "python3.11 -m venv .venv",
    ".venv/bin/pip install -q -r requirements.txt",
    '.venv/bin/pip install -q "jax[tpu]==0.10.2" '
    "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html",
    ".venv/bin/pip install -q --no-deps -e .",
  ]
  positions = [remote.index(step) for step in steps]
  assert positions == sorted(positions), remote
  assert not pathlib.Path(tarball).exists(), "the dry run must not leave a tarball behind"


def test_setup_jax_tpu_pin_matches_requirements(env):
  pin = next(
    line.split("==")[1].strip()
    for line in (_REPO / "requirements.txt").read_text().splitlines()
    if line.startswith("jax==")
  )
  *_, ssh = _commands(env, "setup")
  assert f'"jax[tpu]=={pin}"' in _remote_command(ssh)


def test_setup_from_repo_url_fetches_on_the_workers(env):
  url = "https://github.com/example/micle_jax.git"
  [ssh] = _commands(env, "setup", REPO_URL=url, GIT_REF="v1.0")
  assert _flag(ssh, "worker") == "all"
  remote = _remote_command(ssh)
  assert f"git -C micle_jax remote add origin {url}" in remote
  assert "fetch -q --depth=1 origin v1.0" in remote
  assert remote.index("checkout -q -f FETCH_HEAD") < remote.index("--no-deps -e .")


def test_run_starts_the_same_command_on_all_workers(env):
  [ssh] = _commands(
    env,
    "run",
    "--",
    "--config.num_epochs=1",
    "--config.note=it's a test",
    GCS_WORKDIR=_WORKDIR,
    DATA_DIR="gs://test-bucket/tensorflow_datasets",
  )
  assert _flag(ssh, "worker") == "all"
  remote = _remote_command(ssh)
  assert "cd micle_jax" in remote
  words = shlex.split(remote)
  start = words.index("nohup")
  assert words[start - 2 : start] == [
    "MICLE_DISTRIBUTED=auto",
    "TFDS_DATA_DIR=gs://test-bucket/tensorflow_datasets",
  ]
  assert words[start + 1 : start + 8] == [
    ".venv/bin/python",
    "-m",
    "micle_jax.main",
    "--config=configs/cxr.py",
    f"--workdir={_WORKDIR}",
    "--config.num_epochs=1",
    "--config.note=it's a test",
  ]
  assert ">> train.log 2>&1 < /dev/null &" in remote
  assert "echo $! > train.pid" in remote


@pytest.mark.parametrize(
  "settings",
  [
    {},
    {"GCS_WORKDIR": "/tmp/workdir"},
    {"GCS_WORKDIR": "gs:///no-bucket"},
    {"GCS_WORKDIR": _WORKDIR, "DATA_DIR": "local/tfds"},
  ],
)
def test_run_needs_gcs_paths(env, settings):
  result = _launch(env, "run", **settings)
  assert result.returncode != 0 and result.stdout == ""
  assert ("DATA_DIR" if "DATA_DIR" in settings else "GCS_WORKDIR") in result.stderr


def test_remote_commands_are_valid_shell(env):
  remotes = [
    _remote_command(command)
    for args, settings in [
      (("setup",), {}),
      (("setup",), {"REPO_URL": "https://example.com/r.git"}),
      (("run", "--config.note=it's"), {"GCS_WORKDIR": _WORKDIR, "DATA_DIR": _WORKDIR}),
      (("stop",), {}),
      (("logs",), {}),
    ]
    for command in _commands(env, *args, **settings)
    if command[4] == "ssh"
  ]
  assert len(remotes) == 5
  for remote in remotes:
    result = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
    assert result.returncode == 0, (remote, result.stderr)


def test_run_and_stop_behave_on_a_worker(env, tmp_path):
  """Runs the worker side of `run` and `stop` here, with a fake python that records its input."""
  worker_home = tmp_path / "worker"
  venv_bin = worker_home / "micle_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(
    '#!/bin/sh\nprintf "%s\\n" "$MICLE_DISTRIBUTED" "$TFDS_DATA_DIR" "$@" > args.tmp\n'
    "mv args.tmp args.txt\nexec sleep 60\n"
  )
  (venv_bin / "python").chmod(0o755)
  [run] = _commands(env, "run", "--config.note=a b", GCS_WORKDIR=_WORKDIR, DATA_DIR="gs://d/tfds")
  [stop] = _commands(env, "stop")

  def on_worker(command: list[str]) -> subprocess.CompletedProcess:
    script = _remote_command(command)
    return subprocess.run(
      ["bash", "-c", script], cwd=worker_home, capture_output=True, text=True, timeout=10
    )

  pid_file = worker_home / "micle_jax" / "train.pid"
  try:
    assert on_worker(run).returncode == 0
    args_file = worker_home / "micle_jax" / "args.txt"
    for _ in range(100):
      if args_file.exists():
        break
      time.sleep(0.05)
    assert args_file.read_text().splitlines() == [
      "auto",
      "gs://d/tfds",
      "-m",
      "micle_jax.main",
      "--config=configs/cxr.py",
      f"--workdir={_WORKDIR}",
      "--config.note=a b",
    ]
    second = on_worker(run)
    assert second.returncode != 0 and "already running" in second.stderr
    assert "stopped on" in on_worker(stop).stdout
    assert not pid_file.exists()
    assert "not running on" in on_worker(stop).stdout
  finally:
    if pid_file.exists():
      subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def test_logs_ssh_status_stop(env):
  [logs] = _commands(env, "logs")
  assert _flag(logs, "worker") == "0"
  assert _remote_command(logs) == "tail -n 100 -F micle_jax/train.log"
  [logs_all] = _commands(env, "logs", "all", FOLLOW="0", LOG_LINES="20")
  assert _flag(logs_all, "worker") == "all"
  assert _remote_command(logs_all) == "tail -n 20 micle_jax/train.log"
  [ssh] = _commands(env, "ssh", "3")
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "test-tpu"]
  assert _flag(ssh, "worker") == "3" and not any(a.startswith("--command") for a in ssh)
  assert _launch(env, "ssh", "first").returncode != 0
  [status] = _commands(env, "status")
  assert status[3:6] == ["tpu-vm", "describe", "test-tpu"]
  [status] = _commands(env, "status", QUEUED="1")
  assert status[3:6] == ["queued-resources", "describe", "test-tpu"]
  [stop] = _commands(env, "stop")
  assert _flag(stop, "worker") == "all" and 'kill "$(cat train.pid)"' in _remote_command(stop)


@pytest.mark.parametrize(
  "queued, expected",
  [
    ("0", ["gcloud", "compute", "tpus", "tpu-vm", "delete", "test-tpu"]),
    ("1", ["gcloud", "compute", "tpus", "queued-resources", "delete", "test-tpu"]),
  ],
)
def test_delete_asks_unless_yes(env, queued, expected):
  refused = _launch(env, "delete", stdin="n\n", QUEUED=queued)
  assert refused.returncode != 0 and refused.stdout == ""
  assert "[y/N]" in refused.stderr
  for stdin, settings in [("y\n", {}), ("", {"YES": "1"})]:
    [command] = _commands(env, "delete", stdin=stdin, QUEUED=queued, **settings)
    assert command[:6] == expected
    _assert_located(command)
    assert "--quiet" in command
    assert ("--force" in command) == (queued == "1")


def test_config_file_settings_and_environment_override(env, tmp_path):
  config = tmp_path / "v5e.env"
  config.write_text(
    "TPU_NAME=${TPU_NAME:-from-file}\nACCELERATOR_TYPE=v5litepod-16\nZONE=us-west4-a\n"
  )
  del env["TPU_NAME"], env["ZONE"]
  [command] = _commands(env, "create", CONFIG=str(config))
  assert command[5] == "from-file" and _flag(command, "zone") == "us-west4-a"
  assert _flag(command, "version") == "v2-alpha-tpuv5-lite"
  [command] = _commands(env, "create", CONFIG=str(config), TPU_NAME="from-env")
  assert command[5] == "from-env"


def test_config_example_leaves_project_to_the_user(env):
  del env["PROJECT"], env["TPU_NAME"], env["ZONE"]
  example = str(_REPO / "launch" / "config.env.example")
  result = _launch(env, "create", CONFIG=example)
  assert result.returncode != 0 and "PROJECT" in result.stderr
  [command] = _commands(env, "create", CONFIG=example, PROJECT="my-project")
  assert command[4:6] == ["create", "micle-v4-8"] and "--spot" in command


def test_missing_config_file_is_named(env, tmp_path):
  result = _launch(env, "status", CONFIG=str(tmp_path / "nope.env"))
  assert result.returncode != 0 and "nope.env" in result.stderr


def _shell_files() -> list[pathlib.Path]:
  launch = _REPO / "launch"
  return sorted([*launch.glob("*.sh"), launch / "config.env.example"])


@pytest.mark.skipif(
  shutil.which("shellcheck") is None,
  reason="shellcheck is not installed (apt-get install -y shellcheck)",
)
def test_shellcheck_is_clean():
  result = subprocess.run(
    ["shellcheck", "--shell=bash", "--external-sources", *map(str, _shell_files())],
    cwd=_REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_local_multihost_finds_the_projects_venv(tmp_path):
  """Without PYTHON, the local launcher runs the project's .venv/bin/python, which has the stack
  (a bare `python` usually has not)."""
  repo = tmp_path / "repo"
  shutil.copytree(_REPO / "launch", repo / "launch")
  venv_python = repo / ".venv" / "bin" / "python"
  venv_python.parent.mkdir(parents=True)
  calls = tmp_path / "calls.txt"
  venv_python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$1" in -c) echo 12345 ;; esac\n')
  venv_python.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  env["LOG_DIR"] = str(tmp_path / "logs")
  result = subprocess.run(
    [str(repo / "launch" / "local_multihost.sh"), "2", "--", "--workdir=w"],
    env=env, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  lines = calls.read_text().splitlines()
  assert sum(line.startswith("-m micle_jax.main --workdir=w") for line in lines) == 2, lines

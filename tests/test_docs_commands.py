"""Every `python -m` command in the shell blocks of the README, docs/usage.md and
docs/import_torch.md parses as its
command would parse it: the module exists and defines each flag, the config file loads with its `:arg`, and each
`--config.key=value` names a key of that config with a value of its type.

The commands' behaviour has tests of its own; this one catches a document that drifted from the
flags (a renamed flag, a removed config key, a module moved).
"""

import importlib
import pathlib
import re
import shlex
import sys

import pytest
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md", "docs/import_torch.md")
# Where a command keeps its flags when its module only forwards to another (micle_jax/sweep.py).
_FORWARDED = {
  "micle_jax.sweep": "micle_jax.tools.sweep",
  "micle_jax.study": "micle_jax.tools.study",
  "micle_jax.predict": "micle_jax.tools.predict",
  "micle_jax.probe_attributes": "micle_jax.tools.probe_attributes",
  "micle_jax.benchmark": "micle_jax.tools.benchmark",
  "micle_jax.convert_simclr": "micle_jax.tools.convert_simclr",
  "micle_jax.export_torch": "micle_jax.tools.export_torch",
  "micle_jax.import_torch": "micle_jax.tools.import_torch",
  "data_builders.synthetic": "data_builders.synthetic.__main__",
}


def _commands(text: str) -> list[str]:
  """The `python -m` lines of the shell blocks in `text`, continuation lines joined, comments and
  the optional-part brackets (`[--print_only]`) removed, the first of `a|b|c` alternatives kept."""
  commands = []
  for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith(("python -m ", "MICLE_NATIVE_CONV=0 python -m ")):
        line = re.sub(r"\[([^\]]*)\]", r"\1", line)
        line = re.sub(r"=(\w+)(\|\w+)+", r"=\1", line)
        commands.append(line.split("python -m ", 1)[1])
  return commands


COMMANDS = sorted({c for doc in DOCS for c in _commands((REPO / doc).read_text())})


def test_the_documents_show_the_commands():
  modules = {shlex.split(c)[0] for c in COMMANDS}
  assert {"micle_jax.main", "micle_jax.finetune", "micle_jax.study", "micle_jax.sweep"} <= modules
  assert len(COMMANDS) >= 15, COMMANDS


def _parse(command: str, monkeypatch) -> None:
  """Defines `command`'s flags as its module does and parses its arguments; removes them after."""
  monkeypatch.chdir(REPO)
  module_name, *args = shlex.split(command)
  module = importlib.import_module(_FORWARDED.get(module_name, module_name))
  if module_name == "micle_jax.sweep":
    args = args[1:]  # the subcommand (run, collect)
  argv = [module_name, *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads `--config.*` overrides from it
  before = set(flags.FLAGS)
  module.define_flags()
  try:
    flags.FLAGS(argv)  # an unknown flag, a bad value or an unknown config key raises here
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      assert flags.FLAGS.config.keys()  # a file that failed to load raises on first use
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_documented_command_parses(command, monkeypatch):
  _parse(command, monkeypatch)


@pytest.mark.parametrize(
  "command",
  [
    "micle_jax.main --config=configs/cxr.py --workdir=D --epochs=3",  # no such flag
    "micle_jax.main --config=configs/cxr.py --workdir=D --config.batch_sise=3",  # no such key
    "micle_jax.finetune --config=configs/finetune_cxr.py --workdir=D --config.label_fraction=x",
    "micle_jax.main --config=configs/nothing.py --workdir=D",
  ],
)
def test_a_command_that_drifted_from_its_flags_fails(command, monkeypatch):
  with pytest.raises(Exception):  # noqa: B017 -- absl's and ml_collections' errors all count
    _parse(command, monkeypatch)
  _parse("micle_jax.main --config=configs/cxr.py --workdir=D", monkeypatch)  # and leaves no trace

"""The import rules of the package, checked on the source (AST only: nothing is imported).

Imports flow one way: tools → drivers (main, pretrain, finetune, app) → {eval → data, train →
models} → runtime → specs, with `host` (the machine's cores and CPU) below all. Nothing below
imports tools or drivers; the numerical core (specs, models, train, runtime, host) imports neither
TensorFlow nor flags; `data_builders` import nothing from `micle_jax`; configs import only
`ml_collections` (and each other).
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "micle_jax"

DRIVERS = {"main", "pretrain", "finetune", "app"}
# Command paths kept for the README's commands; each only runs its tool.
ALIASES = {
  "benchmark",
  "convert_simclr",
  "sweep",
  "predict",
  "probe_attributes",
  "study",
  "export_torch",
  "import_torch",
}
# What each part of the package may import from the package (besides itself).
ALLOWED = {
  "package": {"runtime"},  # micle_jax/__init__.py: the allocator's restart (runtime/allocator.py)
  "host": set(),  # facts about the machine (cores, CPU): the bottom, everyone may ask
  "specs": set(),
  "runtime": {"specs", "host"},
  "models": {"specs", "host"},
  "train": {"specs", "models", "runtime", "host"},
  "data": {"specs", "runtime", "host"},
  "eval": {"specs", "models", "runtime", "data", "host"},
  "drivers": {"specs", "models", "runtime", "train", "data", "eval", "drivers", "host"},
  "tools": {"specs", "models", "runtime", "train", "data", "eval", "drivers", "tools", "host"},
}
NUMERICAL_CORE = {"specs", "models", "train", "runtime", "host"}
TENSORFLOW = ("tensorflow", "tensorflow_datasets")
FLAGS = ("absl.flags", "ml_collections.config_flags")


def _part(module: str) -> str:
  """The part of the package a module `micle_jax.x[.y]` belongs to."""
  parts = module.split(".")
  if len(parts) == 1:
    return "package"
  if parts[1] in DRIVERS:
    return "drivers"
  if parts[1] in ALIASES:
    return "tools"
  return parts[1]


def _module_name(path: pathlib.Path) -> str:
  relative = path.relative_to(REPO).with_suffix("")
  parts = list(relative.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, dotted name) of every import in the file, `from a import b` giving `a.b`."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}:{node.lineno}: relative import"
      out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
  return out


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(folder.rglob("*.py"))


def _violations(path: pathlib.Path) -> list[str]:
  """The import rules this file of `micle_jax` breaks."""
  me = _part(_module_name(path))
  found = []
  for line, name in _imports(path):
    where = f"{path.relative_to(REPO)}:{line} imports {name}"
    if name.startswith("micle_jax."):
      target = _part(".".join(name.split(".")[:2]))
      if target != me and target not in ALLOWED[me]:
        found.append(f"{where}: {me} may not import {target}")
    if me in NUMERICAL_CORE and name.startswith(TENSORFLOW):
      found.append(f"{where}: the numerical core imports no TensorFlow")
    if me not in ("drivers", "tools") and name.startswith(FLAGS):
      found.append(f"{where}: only commands define flags")
  return found


def test_every_module_belongs_to_a_part():
  for path in _files(PACKAGE):
    part = _part(_module_name(path))
    assert part == "package" or part in ALLOWED, f"{path}: not in a known part ({part})"


def test_imports_flow_one_way():
  violations = [v for path in _files(PACKAGE) for v in _violations(path)]
  assert not violations, "\n".join(violations)


def _imports_of(folder: str, keep) -> list[str]:
  """`file:line imports name` for each import under `folder` whose top-level name `keep`s."""
  return [
    f"{path.relative_to(REPO)}:{line} imports {name}"
    for path in _files(REPO / folder)
    for line, name in _imports(path)
    if keep(name.split(".")[0])
  ]


def test_data_builders_import_nothing_of_the_training_code():
  found = _imports_of("data_builders", lambda top: top in ("micle_jax", "configs"))
  assert not found, "\n".join(found)


def test_configs_import_only_ml_collections():
  found = _imports_of("configs", lambda top: top not in ("ml_collections", "configs"))
  assert not found, "\n".join(found)


def test_command_aliases_only_run_their_tool():
  for name in ALIASES:
    imports = {module for _, module in _imports(PACKAGE / f"{name}.py")}
    assert imports == {"runpy"}, f"micle_jax/{name}.py imports {imports}"
    assert f'"micle_jax.tools.{name}"' in (PACKAGE / f"{name}.py").read_text()


@pytest.mark.parametrize(
  "source, message",
  [
    ("from micle_jax.tools import sweep\n", "train may not import tools"),
    ("from micle_jax import finetune\n", "train may not import drivers"),
    ("import tensorflow as tf\n", "imports no TensorFlow"),
    ("from absl import flags\n", "only commands define flags"),
  ],
)
def test_the_rules_catch_a_bad_import(tmp_path, monkeypatch, source, message):
  fake = PACKAGE / "train" / "bad.py"
  monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: source)
  assert any(message in v for v in _violations(fake))

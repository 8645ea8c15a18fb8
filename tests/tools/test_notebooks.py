"""The result notebooks run headless on a CSV collected from fake sweep results and save PNGs."""

import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from test_sweep import write_fake_sweep

from micle_jax.tools import sweep

NOTEBOOKS = pathlib.Path(__file__).parents[2] / "notebooks"
KERNEL = "micle-jax-test"


@pytest.fixture(scope="module")
def arms_csv(tmp_path_factory) -> pathlib.Path:
  """arms.csv (and results.csv beside it) of a fake sweep (2 inits × 2 fractions × 2 seeds, NIH
  shift)."""
  root = tmp_path_factory.mktemp("sweep")
  write_fake_sweep(root)
  sweep.report(root, num_samples=30, plot=False)
  return root / sweep.ARMS_FILE


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A kernelspec running this interpreter, found through JUPYTER_PATH; IPython kept in tmp."""
  home = tmp_path_factory.mktemp("jupyter")
  spec = home / "kernels" / KERNEL
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  spec.joinpath("kernel.json").write_text(
    json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
  )
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(home))
    mp.setenv("JUPYTER_RUNTIME_DIR", str(home / "runtime"))
    mp.setenv("IPYTHONDIR", str(home / "ipython"))
    mp.setenv("MPLCONFIGDIR", str(home / "matplotlib"))
    yield


def _with_parameters(nb: nbformat.NotebookNode, **params) -> nbformat.NotebookNode:
  """Inserts a cell setting `params` after the cell tagged "parameters" (as papermill does)."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  assert "ARMS = " in nb.cells[index].source
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, id="injected-parameters"))
  return nb


@pytest.mark.parametrize(
  "name, png, expected",
  [
    ("label_efficiency", "label_efficiency.png", ["scratch", "micle", "10.00%", "runs 2 in"]),
    ("distribution_shift", "distribution_shift.png", ["in_distribution", "nih", "runs 2"]),
  ],
)
def test_notebook_runs_and_saves_its_figure(kernel_env, arms_csv, tmp_path, name, png, expected):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  colab = nb.cells[1].source.splitlines()
  assert all(line.startswith("#") for line in colab if line.strip())  # Installs nothing here.
  nb = _with_parameters(nb, ARMS=str(arms_csv))
  client = NotebookClient(
    nb, kernel_name=KERNEL, timeout=60, resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  out = arms_csv.parent / png
  assert out.stat().st_size > 1000
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  for text in expected:
    assert text in printed
  assert not list(tmp_path.iterdir())  # Written next to the CSV, not in the working directory.

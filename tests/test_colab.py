"""colabs/explore_trailers12k.ipynb runs end to end (nbclient) on the run."""

import os

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.xdist_group("pipeline")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "explore_trailers12k.ipynb")
PLOTS = ("genres", "shots", "clips", "soundtrack", "prediction", "pr_curves")


def test_notebook_is_stripped_and_installs_in_colab_only():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  first = code[0].source
  assert '"google.colab" in sys.modules' in first and "pip" in first
  assert "YOUR_ORG" not in first  # A local checkout needs no URL.


def test_notebook_runs(trained_workdir, tmp_path, monkeypatch):
  plots_dir = tmp_path / "plots"
  # The kernel inherits this process's environment.
  monkeypatch.setenv("DIVITA_WORKDIR", trained_workdir)
  monkeypatch.setenv("DIVITA_PLOTS_DIR", str(plots_dir))
  tfds_dir = os.path.join(trained_workdir, "tfds", "trailers12k")
  built = sorted(os.listdir(tfds_dir))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": ROOT}},
  )
  client.execute()  # Raises CellExecutionError on the first failing cell.
  text = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.outputs
  )
  assert trained_workdir in text
  assert sorted(os.listdir(tfds_dir)) == built  # The run's dataset, reused.
  assert "true genres:" in text and " shots, " in text
  assert "No study: set DIVITA_STUDY_DIR" in text
  for name in PLOTS:
    image = matplotlib.image.imread(plots_dir / f"{name}.png")
    assert image.shape[0] > 200 and image.shape[1] > 400, name
    assert image[..., :3].std() > 0.05, f"{name}.png is blank"

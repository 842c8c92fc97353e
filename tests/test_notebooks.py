"""Every notebook runs top to bottom on CPU, as a user would run it."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a laptop
  # The alignment ladder at a quarter of its steps (7 minutes in full on 2 cores): the same
  # cells; its results are described for the full run.
  monkeypatch.setenv("JAXLLM_NOTEBOOK_STEPS", "0.25")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors

"""The Colab notebooks run top to bottom (a real kernel, CPU runtime)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["tiny_pretrain.ipynb"])
def test_notebook_runs(name, tmp_path):
  nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
  os.environ["R1JAX_REPO"] = REPO
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "pass@1" in text and "greedy:" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)

"""The Colab notebooks run top to bottom (a real kernel, CPU runtime) at their
default, small settings, and print what they say they show."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import SHARED_DATA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([0-9][0-9.e+-]*)"


def _floats(pattern: str, text: str) -> list[float]:
  return [float(m) for m in re.findall(pattern, text)]


def _check_tiny_pretrain(text: str, images: int):
  assert "pass@1" in text and "greedy:" in text
  assert images >= 1


def _check_quickstart(text: str, images: int):
  # The before/after table of results.json, the samples and both plots.
  (before, after), = re.findall(rf"\npass@1\s+{NUMBER}\s+{NUMBER}\n", text)
  assert 0.0 <= float(before) <= 1.0 and 0.0 <= float(after) <= 1.0
  assert "before" in text and "after" in text and "format_rate" in text
  assert re.search(r"reward \d\.\d\d \| completion: ", text), "no samples.jsonl rows printed"
  assert images >= 2  # reward_curve.png and the metrics.jsonl plot


def _check_moe_routing(text: str, images: int):
  assert "deepseek-v3: 671.0B parameters, 36.6B activated per token" in text
  ratios = _floats(rf"load max/mean = {NUMBER}", text)
  assert ratios and all(r >= 1.0 for r in ratios), ratios
  # The bias updates move the load towards balance.
  (start, end), = re.findall(rf"load max/mean: {NUMBER} with zero biases, {NUMBER} over the last", text)
  assert float(end) < float(start), (start, end)
  assert re.search(r"limit changed the choice of [0-9.]+% of tokens", text)
  # Dropless (ragged_dot) and no-drop capacity dispatch agree; capacity 1.25 drops.
  ragged, = _floats(rf"dropless, ragged_dot\s+dropped\s+0\.0%\s+max abs difference vs reference {NUMBER}",
                    text)
  no_drop, = _floats(rf"capacity, factor E/K = \d+\s+dropped\s+0\.0%\s+max abs difference vs "
                     rf"reference {NUMBER}", text)
  assert ragged < 1e-4 and no_drop < 1e-4, (ragged, no_drop)
  dropped, = _floats(r"capacity, factor 1\.25\s+dropped\s+([0-9.]+)%", text)
  assert dropped > 0.0
  assert images >= 4  # logged loads, per-expert loads, per-token routing, bias updates


def _check_load_hf_checkpoint(text: str, images: int):
  del images
  assert "model.safetensors.index.json" in text  # the checkpoint and the export are sharded
  diffs = _floats(rf"max abs logit difference {NUMBER}", text)
  assert len(diffs) == 2 and max(diffs) < 1e-4, diffs  # import, and export + reload
  assert re.search(r"problem 1, sample 1 \(\d+ tokens\): ", text)
  summary = text.split("evaluation summary:", 1)[1]
  assert '"num_problems": 4' in summary and '"num_samples": 2' in summary
  pass1, = _floats(rf'"pass@1": {NUMBER}', summary)
  assert 0.0 <= pass1 <= 1.0


CHECKS = {
    "tiny_pretrain.ipynb": _check_tiny_pretrain,
    "quickstart.ipynb": _check_quickstart,
    "moe_routing.ipynb": _check_moe_routing,
    "load_hf_checkpoint.ipynb": _check_load_hf_checkpoint,
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_notebook_runs(name, tmp_path, monkeypatch):
  if name == "load_hf_checkpoint.ipynb":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not os.path.exists(os.path.join(SHARED_DATA, "gsm8k", "test.jsonl")):
      pytest.skip("../shared/data is not beside the repo")
  nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert nb.cells[0].cell_type == "markdown"
  assert "'pip', 'install', '-q', '-e', REPO" in code[0]
  assert not any("sys.path" in src for src in code)  # the installed package, no path tricks
  monkeypatch.setenv("R1JAX_REPO", REPO)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, "\n".join(errors[0].get("traceback", []))[-3000:]
  text = "".join(o.get("text", "") for o in outputs
                 if o.output_type == "stream" and o.get("name") == "stdout")
  images = sum("image/png" in o.get("data", {}) for o in outputs)
  CHECKS[name](text, images)

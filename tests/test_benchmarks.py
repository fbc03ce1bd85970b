"""The benchmark scripts still run end to end (tiny shapes, CPU): they are how
issue 10's figures are produced, so a refactor must not leave them broken."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mfu_benchmark_runs_variants_in_children_and_prints_the_table():
  proc = subprocess.run(
      [sys.executable, "benchmarks/mfu.py", "--preset", "tiny", "--rows", "2", "--seq", "128",
       "--dtype", "float32", "--steps", "1", "--variants", "", "remat=1,micro=2", "bogus=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode != 0 and "unknown variant key 'bogus'" in proc.stdout + proc.stderr
  proc = subprocess.run(
      [sys.executable, "benchmarks/mfu.py", "--preset", "tiny", "--rows", "2", "--seq", "128",
       "--dtype", "float32", "--steps", "1", "--variants", "", "remat=1,micro=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = [l.split() for l in proc.stdout.splitlines() if l.startswith("attention=")]
  assert len(rows) == 2 and all("failed" not in r for r in rows), proc.stdout
  # Rematerialisation and gradient accumulation give the same loss (last column).
  assert abs(float(rows[0][-1]) - float(rows[1][-1])) < 1e-5, proc.stdout
  assert "n/a" in rows[0]  # no datasheet peak for a CPU


def test_decode_floor_counts_a_shared_prompt_once_per_group():
  """The attention floor's KV bytes: each row's own slots, plus the prompt's
  slots once per group of rows that share it (as the sampler reads them)."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import roofline
  finally:
    sys.path.pop(0)
  c = roofline.BENCH
  rates = {"attention": float("inf"), "bandwidth": 1.0}  # bytes only
  slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * 4
  contexts = range(65, 192)  # prompt 64, 127 decode steps
  rows, G, P = 128, 8, 64
  own = rows * sum(ctx - P for ctx in contexts)
  assert roofline.attention_seconds(c, rows, contexts, rates, shared=P, group=G) == (
      slot * (own + rows // G * P * len(contexts)))
  assert roofline.attention_seconds(c, rows, contexts, rates) == slot * rows * sum(contexts)

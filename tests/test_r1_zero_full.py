"""Issue 3's acceptance run: the tiny R1-Zero main job, end to end (base
pretraining -> GRPO -> held-out evaluation), lifts held-out pass@1 by at least
0.20 absolute with a format rate of at least 0.9 after RL, within 25 minutes,
for two seeds.

Slow (~8 minutes per seed on a quiet 2-core box, 2026-11-22):
  python -m pytest --runslow tests/test_r1_zero_full.py
The same pipeline at smoke size runs in every CI (tests/test_grpo_trainer.py).
"""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_r1_zero_improves_the_base(tmp_path, seed):
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={REPO}/configs/r1_zero.py:tiny",
       f"--workdir={tmp_path}", f"--config.seed={seed}"],
      capture_output=True, text=True, cwd=REPO, timeout=3600)
  wall = time.time() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  before, after = results["before"], results["after"]
  print(json.dumps({"before": before, "after": after, "seconds": results["seconds"]}, indent=1),
        f"\nwall: {wall:.0f} s")
  assert after["pass@1"] >= before["pass@1"] + 0.20, (before["pass@1"], after["pass@1"])
  assert after["format_rate"] >= 0.9, after["format_rate"]
  assert wall < 25 * 60, wall
  assert os.path.getsize(tmp_path / "reward_curve.png") > 1000

"""The experiment scripts at seconds-scale: experiments/r1_zero_dynamics
(GRPO, PPO and curriculum runs from one base, table and plots) and an
experiments/ablations sweep from that base."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(*args, timeout=1500):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def dynamics(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dynamics")
  out = _script("experiments/r1_zero_dynamics/run.py", f"--workdir={workdir}", "--smoke")
  return workdir, out


def test_r1_zero_dynamics_writes_its_table_and_plots(dynamics):
  workdir, out = dynamics
  results = json.load(open(workdir / "results.json"))
  table = results["table"]
  assert set(table) == {"base", "grpo @2", "grpo @4", "ppo @2", "curriculum @2"}
  for name, row in table.items():
    assert 0 <= row["pass@1"] <= 1, name
  # Equal samples for GRPO and PPO; the critic doubles the state; dynamic
  # sampling draws at least one round of prompts per step.
  assert table["ppo @2"]["completions_sampled"] == table["grpo @2"]["completions_sampled"]
  assert 1.9 < table["ppo @2"]["state_mib"] / table["grpo @2"]["state_mib"] < 2.1
  assert table["curriculum @2"]["completions_sampled"] >= table["grpo @2"]["completions_sampled"]
  assert [r["step"] for r in results["curriculum"]] == [1, 2]
  assert "1-4" in results["dynamics"] and "reflection/rate" in results["dynamics"]["1-4"]
  for png in ("dynamics.png", "comparison.png"):
    assert os.path.getsize(workdir / png) > 5000
  assert "| ppo @2 |" in open(workdir / "table.md").read() and "| ppo @2 |" in out
  # The base's corpus has self-correcting solutions (the question the study asks).
  base_config = json.load(open(workdir / "base" / "config.json"))
  assert base_config["data"]["self_correct_fraction"] == 0.1


def test_an_ablation_sweep_from_that_base(dynamics, tmp_path):
  workdir, _ = dynamics
  spec = importlib.util.spec_from_file_location(
      "sweep", os.path.join(REPO, "experiments", "ablations", "sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  assert {"beta", "group_size", "loss_aggregation", "clip_higher", "algorithm"} <= set(sweep.SWEEPS)
  sweep.SWEEPS["test"] = [("beta=0", ["--config.grpo.beta=0.0"]),
                          ("beta=0.04", ["--config.grpo.beta=0.04"])]
  rows = sweep.run_sweep("test", str(tmp_path), str(workdir / "base"), steps=1, seed=0,
                         preset="smoke")
  assert list(rows) == ["beta=0", "beta=0.04"]
  assert all(len(r["curve"]) == 1 and 0 <= r["pass@1"] <= 1 for r in rows.values())
  assert os.path.getsize(tmp_path / "test" / "curves.png") > 5000
  assert "| beta=0.04 |" in open(tmp_path / "test" / "table.md").read()


def test_r1_tiny_seeds_share_the_first_seeds_bases(tmp_path, monkeypatch):
  """experiments/r1_tiny --bases=shared: later seeds post-train from the first
  seed's teacher and student bases; per_seed: each pretrains its own."""
  spec = importlib.util.spec_from_file_location(
      "r1_tiny", os.path.join(REPO, "experiments", "r1_tiny", "run.py"))
  r1_tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(r1_tiny)
  calls = []
  monkeypatch.setattr(r1_tiny, "_main", lambda config, workdir, log, *flags: calls.append(
      (config, os.path.relpath(workdir, tmp_path), flags)) or 0.0)
  monkeypatch.setattr(r1_tiny, "write_table", lambda *a: None)
  r1_tiny.main([f"--workdir={tmp_path}", "--seeds=0,1"])
  teacher, student = (os.path.join(tmp_path, "seed0", *p) for p in
                      (("r1", "r1_zero", "base"), ("distill", "student_base")))
  by_dir = {w: flags for _, w, flags in calls}
  assert [w for _, w, _ in calls] == [f"seed{s}/{n}" for s in (0, 1)
                                      for n in ("r1", "distill", "student_rl")]
  assert by_dir["seed0/r1"] == ("--config.seed=0",)  # seed 0 pretrains both bases
  assert f"--config.base_workdir={teacher}" in by_dir["seed1/r1"]
  assert f"--config.student_base_workdir={student}" in by_dir["seed1/distill"]
  for s in (0, 1):
    assert f"--config.base_workdir={student}" in by_dir[f"seed{s}/student_rl"]
    assert f"--config.seed={s}" in by_dir[f"seed{s}/r1"]
  calls.clear()
  r1_tiny.main([f"--workdir={tmp_path}", "--seeds=0,1", "--bases=per_seed"])
  assert not any("seed0" in f for _, w, flags in calls if w.startswith("seed1")
                 for f in flags)

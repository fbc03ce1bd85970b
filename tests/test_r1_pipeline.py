"""The R1 pipeline (configs/r1.py:smoke) through the real entry point: R1-Zero
(with its base), then the four stages, each a few steps; every stage writes
its results, data and statistics, the table has a row per model, and a re-run
reuses the finished stages."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_cli import _assert_one_line_error, _cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("cold_start", "reasoning_rl", "rejection_sft", "all_scenario_rl")


def _run(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={REPO}/configs/r1.py:smoke",
       f"--workdir={workdir}", "--config.train.progress_bar=False", *flags],
      capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("r1")
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_every_stage_runs_and_reports(smoke_run):
  w = smoke_run
  results = json.load(open(w / "results.json"))
  assert sorted(results["table"]) == sorted(["base", "r1_zero", *STAGES])
  for name, row in results["table"].items():
    for key in ("pass@1", "cons@2", "format_rate", "summary_format_rate", "language_consistency",
                "mean_completion_length"):
      assert row[key] is not None and 0 <= row[key] <= (1 if key != "mean_completion_length"
                                                          else 1e9), (name, key)
  for name in STAGES:
    r = json.load(open(w / name / "results.json"))
    assert r["stage"] == name and "pass@1" in r["eval"]
    assert os.listdir(w / name / "checkpoints")
  # Cold start and rejection sampling write their data and its statistics.
  for name in ("cold_start", "rejection_sft"):
    stats = json.load(open(w / name / "data" / "stats.json"))
    rows = [json.loads(l) for l in open(w / name / "data" / "data.jsonl")]
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"]
    assert len([r for r in rows if r["kind"] == "reasoning"]) == stats["reasoning"] >= 4
    assert all("<think>" in r["completion"] for r in rows if r["kind"] == "reasoning")
  mixed = [json.loads(l) for l in open(w / "rejection_sft" / "data" / "data.jsonl")]
  assert any(r["kind"] == "non_reasoning" for r in mixed)
  # Stage 2 adds the language reward; stage 4 the reward model's, judged on held-out pairs.
  m2 = [json.loads(l) for l in open(w / "reasoning_rl" / "metrics.jsonl")]
  assert all("rewards/language/mean" in r for r in m2)
  m4 = [json.loads(l) for l in open(w / "all_scenario_rl" / "metrics.jsonl")]
  assert all("rewards/helpfulness/mean" in r and r["rewards/helpfulness/errors"] == 0 for r in m4)
  rm = results["stages"]["all_scenario_rl"]["reward_model"]
  assert 0.0 <= rm["heldout_pair_accuracy"] <= 1.0 and rm["heldout_pairs"] == 8


def test_rerun_reuses_finished_stages_and_bad_stage_lists_fail(smoke_run, tmp_path):
  before = {n: os.path.getmtime(smoke_run / n / "results.json") for n in STAGES}
  proc = _run(smoke_run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {n: os.path.getmtime(smoke_run / n / "results.json") for n in STAGES} == before
  _assert_one_line_error(
      _cli(f"--config={REPO}/configs/r1.py:smoke", f"--workdir={tmp_path}",
           "--config.stages=reasoning_rl,cold_start"),
      "stages='reasoning_rl,cold_start': pick, in order, from cold_start")

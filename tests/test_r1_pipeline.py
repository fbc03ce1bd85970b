"""The R1 pipeline (configs/r1.py:smoke) through the real entry point: R1-Zero
(with its base), then the four stages, each a few steps; every stage writes
its results, data and statistics, the table has a row per model, and a re-run
reuses the finished stages."""

import json
import os
import subprocess
import sys

import numpy as np
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


def test_r1_zero_smoke_run_writes_its_results_and_metrics(smoke_run):
  """The R1-Zero run R1 starts from is configs/r1_zero.py's stage through the CLI."""
  from tests.test_grpo_trainer import TRL_KEYS
  w = smoke_run / "r1_zero"
  results = json.load(open(w / "results.json"))
  for block in ("before", "after"):
    assert 0.0 <= results[block]["pass@1"] <= 1.0 and "format_rate" in results[block], results
  assert results["optimizer_steps"] == 3
  rows = [json.loads(l) for l in open(w / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in TRL_KEYS:
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["completions/mean_length"] > 0
  assert results["dynamics"]["step"] == [1, 2, 3]
  assert results["dynamics"]["reflection/rate"] == [r["reflection/rate"] for r in rows]
  assert os.path.getsize(w / "reward_curve.png") > 1000
  samples = [json.loads(l) for l in open(w / "samples.jsonl")]
  assert {"prompt", "completion", "reward"} <= set(samples[0])


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


# ---------------------------------------------------------------------------
# Distillation and experiments/r1_tiny on top of the smoke R1 run.
# ---------------------------------------------------------------------------

def _load_module(path, name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_distillation_and_the_r1_tiny_table(smoke_run, tmp_path):
  r1_tiny = _load_module(os.path.join(REPO, "experiments", "r1_tiny", "run.py"), "r1_tiny")
  seed_dir = tmp_path / "seed0"
  seed_dir.mkdir()
  os.symlink(smoke_run, seed_dir / "r1")  # the finished R1 run is reused, not rerun
  # The student base, distillation (sequence) and the RL-only student, through the CLI.
  r1_tiny.main([f"--workdir={tmp_path}", "--seeds=0", "--smoke"])
  dist = json.load(open(seed_dir / "distill" / "results.json"))
  data = [json.loads(l) for l in open(smoke_run / "rejection_sft" / "data" / "data.jsonl")]
  assert dist["method"] == "sequence" and dist["data"]["examples"] == len(data)
  assert dist["sft_steps"] == 3 and "pass@1" in dist["before"] and "pass@1" in dist["after"]
  assert os.path.exists(seed_dir / "distill" / "student_base" / "tokenizer.model")
  # The student speaks the teacher's tokenizer (copied, not retrained).
  teacher_tok = smoke_run / "r1_zero" / "base" / "tokenizer.model"
  assert open(teacher_tok, "rb").read() == open(
      seed_dir / "distill" / "student_base" / "tokenizer.model", "rb").read()
  out = json.load(open(tmp_path / "results.json"))
  assert out["wall"]["ran"] == 3 and out["wall"]["tasks"] == 6  # tokenizer, bases, r1 reused
  out = r1_tiny.write_table(str(tmp_path), [0])
  rows = out[0]["rows"]
  assert set(rows) == {"base", "r1_zero", "r1/cold_start", "r1/reasoning_rl", "r1/rejection_sft",
                       "r1/all_scenario_rl", "student base", "student distilled",
                       "student RL-only"}
  assert all(0 <= r["pass@1"] <= 1 and r["language_consistency"] is not None
             for r in rows.values())
  assert len(out[0]["checks"]) == 5 and (tmp_path / "table.md").exists()

  # Token-level KD from the R1 run's final params, on the same student base.
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={REPO}/configs/distill.py:smoke",
       f"--workdir={tmp_path / 'kd'}", f"--config.teacher_workdir={smoke_run}",
       f"--config.student_base_workdir={seed_dir / 'distill' / 'student_base'}",
       "--config.distill.method=token", "--config.train.log_every=1",
       "--config.train.progress_bar=False"],
      capture_output=True, text=True, timeout=900, cwd=REPO, env=dict(os.environ,
                                                                    JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  kd = json.load(open(tmp_path / "kd" / "results.json"))
  assert kd["method"] == "token"
  rows = [json.loads(l) for l in open(tmp_path / "kd" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(r["kd_loss"] > 0 and 0 <= r["kd/agreement"] <= 1 for r in rows)


def test_distill_without_a_teacher_is_one_line(tmp_path):
  _assert_one_line_error(
      _cli(f"--config={REPO}/configs/distill.py:smoke", f"--workdir={tmp_path}"),
      "distill needs teacher_workdir")

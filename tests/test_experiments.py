"""The experiment scripts at seconds-scale: experiments/r1_zero_dynamics
(GRPO, PPO and curriculum runs from one base, table and plots) and an
experiments/ablations sweep from that base, and the operand probe on it."""

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


def test_operand_probe_labels_every_step_word_by_its_source(dynamics):
  spec = importlib.util.spec_from_file_location(
      "operand_probe", os.path.join(REPO, "experiments", "operand_probe.py"))
  probe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(probe)
  from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
  # "(9 - 3) * 2": "first we subtract 3 from 9 to get 6 . finally we multiply
  # 6 by 2 to get 12 . so the answer is 12 ." (subtraction names b first)
  problem = tinyworld._problem_from_tree(("*", ("-", 9, 3), 2))  # pylint: disable=protected-access
  for lang in tinyworld.LANGS:
    text, numbers = probe.labelled_document(problem, lang)
    verbs = {"en": ("subtract", "multiply"), "la": ("subtrahimus", "multiplicamus")}[lang]
    assert [(n, kind) for _, n, kind in numbers] == [
        (verbs[0], "operators"), ("3", "next operands"), ("9", "first operand"),
        ("6", "results"), (verbs[1], "operators"), ("6", "carried"), ("2", "next operands"),
        ("12", "results"), ("12", "answer")]
    assert all(text[at:at + len(n)] == n for at, n, _ in numbers)
  # The CLI on the smoke base: one row, a share per kind.
  workdir, _ = dynamics
  out = _script("experiments/operand_probe.py", f"--model_path={workdir / 'base'}",
                "--num_problems=8")
  row = [line for line in out.splitlines() if line.startswith(f"| {workdir / 'base'} |")]
  assert len(row) == 1 and row[0].count("%") == len(probe.KINDS), out


def _r1_tiny():
  spec = importlib.util.spec_from_file_location(
      "r1_tiny", os.path.join(REPO, "experiments", "r1_tiny", "run.py"))
  r1_tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(r1_tiny)
  return r1_tiny


def test_r1_tiny_plan_shares_the_first_seeds_bases(tmp_path):
  """experiments/r1_tiny --bases=shared: the first seed pretrains the teacher
  and student bases (after one tokenizer), later seeds post-train from them;
  per_seed: each pretrains its own."""
  r1_tiny = _r1_tiny()
  tasks = r1_tiny.plan(str(tmp_path), [0, 1], smoke=False)
  by_name = {t.name: t for t in tasks}
  assert list(by_name) == ["seed0/tokenizer", "seed0/teacher base", "seed0/student base",
                           "seed0/r1", "seed1/r1", "seed0/distill", "seed1/distill",
                           "seed0/student_rl", "seed1/student_rl"]
  for i, t in enumerate(tasks):  # every dependency comes earlier in the list
    assert all(d in [u.name for u in tasks[:i]] for d in t.deps), t.name
  assert by_name["seed0/teacher base"].deps == by_name["seed0/student base"].deps == (
      "seed0/tokenizer",)
  teacher, student = (os.path.join(tmp_path, "seed0", *p) for p in
                      (("r1", "r1_zero", "base"), ("distill", "student_base")))
  argv = lambda name: by_name[name].argv
  assert "--config.seed=0" in argv("seed0/r1") and not any(
      "base_workdir" in a for a in argv("seed0/r1"))  # finds its base in place
  assert f"--config.base_workdir={teacher}" in argv("seed1/r1")
  assert f"--config.student_base_workdir={student}" in argv("seed1/distill")
  assert by_name["seed1/distill"].deps == ("seed1/r1", "seed0/student base")
  for s in (0, 1):
    assert f"--config.base_workdir={student}" in argv(f"seed{s}/student_rl")
    assert f"--config.seed={s}" in argv(f"seed{s}/r1")
  per_seed = r1_tiny.plan(str(tmp_path), [0, 1], smoke=False, bases="per_seed")
  assert {"seed1/tokenizer", "seed1/teacher base", "seed1/student base"} <= {
      t.name for t in per_seed}
  assert not any("seed0" in a for t in per_seed if t.name.startswith("seed1")
                 for a in t.argv + list(t.deps))


def test_r1_tiny_schedule_runs_tasks_in_parallel_after_their_deps(tmp_path):
  r1_tiny = _r1_tiny()
  T = lambda name, deps=(), code="": r1_tiny.Task(
      name, [sys.executable, "-c", f"import time,sys; t = time.time(); time.sleep(0.5); {code}"
             f"open({str(tmp_path / name)!r}, 'w').write(f'{{t}} {{time.time()}}')"],
      str(tmp_path / name), str(tmp_path / f"{name}.log"), deps)
  seconds = r1_tiny.schedule([T("a"), T("b"), T("c", ("a", "b")), T("d")], jobs=2, poll_s=0.05)
  assert set(seconds) == {"a", "b", "c", "d"} and all(v >= 0.5 for v in seconds.values())
  (a0, a1), (b0, b1), (c0, c1), (d0, d1) = (
      map(float, open(tmp_path / n).read().split()) for n in "abcd")
  assert c0 >= max(a1, b1)  # started after both its deps finished
  assert a0 < b1 and b0 < a1 and d0 < c1  # two at a time
  # A finished task is reused; a failing one stops new starts and names its log.
  assert r1_tiny.schedule([T("a")], jobs=1, poll_s=0.05) == {"a": 0.0}
  with pytest.raises(SystemExit, match="e.log"):
    r1_tiny.schedule([T("e", code="sys.exit(3); "), T("f", ("e",))], jobs=2, poll_s=0.05)
  assert not os.path.exists(tmp_path / "f.log")

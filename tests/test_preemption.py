"""Pre-emption: a run SIGKILLed at random moments (one of them inside a
checkpoint commit) or SIGTERMed, then restarted with the same command, ends
with exactly the params, optimizer state, reference model, metrics and
samples of an uninterrupted run (CPU: bitwise).

CI: a micro GRPO run through the real loop (tests/preempt_driver.py micro),
with the KL term, the reference refreshed every 2 steps and a checkpoint every
step. --runslow: the R1-Zero smoke pipeline through the CLI, pretraining of
the base included, killed many times.

Kill moments are random but tied to progress (the k-th metrics row plus a
random delay), so they land inside sampling, updates, metric writes and
checkpoint writes rather than after the run has finished.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "preempt_driver.py")
CLI_FLAGS = [f"--config={REPO}/configs/r1_zero.py:smoke",
             "--config.pretrain.train.num_steps=4", "--config.pretrain.train.checkpoint_every=2",
             "--config.pretrain.train.progress_bar=False", "--config.grpo.num_steps=4",
             "--config.grpo.beta=0.04", "--config.grpo.ref_refresh_every=2",
             "--config.train.checkpoint_every=1", "--config.train.progress_bar=False"]
# Wall-clock figures differ between any two runs, interrupted or not; `source`
# names the run's own directory.
UNSTABLE = ("time/", "tokens_per_sec", "seconds", "source")


def _env(cache_dir):
  # One compilation cache for all the runs: a restart loads its programs
  # instead of compiling them again (the same executables either way).
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


class Run:
  """One job: the command that runs it, the environment, its log."""

  def __init__(self, args, env, log_path):
    self.args, self.env, self.log_path = args, env, log_path

  def start(self, commit_kill=None):
    kill = [] if commit_kill is None else ["--commit-kill", str(commit_kill)]
    with open(self.log_path, "a") as log:
      return subprocess.Popen([sys.executable, DRIVER, *kill, *self.args], cwd=REPO,
                              env=self.env, stdout=log, stderr=subprocess.STDOUT)

  def log(self, text):
    with open(self.log_path, "a") as f:
      f.write(f"\n=== {text}\n")

  def tail(self):
    return open(self.log_path).read()[-3000:]

  def to_end(self):
    rc = self.start().wait(timeout=600)
    assert rc == 0, self.tail()


def _micro_run(workdir, tokenizer, env, log_path):
  return Run(["micro", str(workdir), str(tokenizer)], env, log_path)


def _cli_run(workdir, env, log_path):
  return Run(["cli", *CLI_FLAGS, f"--workdir={workdir}"], env, log_path)


def _strip(value):
  if isinstance(value, dict):
    return {k: _strip(v) for k, v in value.items() if not any(u in k for u in UNSTABLE)}
  return value


def _rows(path):
  """Every row as written (no de-duplication: a resumed run must not repeat a step)."""
  return [_strip(json.loads(line)) for line in open(path)]


def _count_rows(path):
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def _mtime(path):
  try:
    return os.stat(path).st_mtime
  except FileNotFoundError:
    return 0.0


def _checkpoint(ckpt_dir):
  """(latest step, every leaf of its tree: params, optimizer state, RNG, reference)."""
  import jax
  import orbax.checkpoint as ocp
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  with ocp.PyTreeCheckpointer() as c:
    tree = c.restore(os.path.join(ckpt_dir, str(steps[-1]), "state"))
  return steps[-1], [np.asarray(x) for x in jax.tree.leaves(tree)]


def _tmp_checkpoints(workdir):
  dirs = [workdir / "checkpoints", workdir / "base" / "checkpoints"]
  return [os.path.join(d, n) for d in dirs if d.exists() for n in os.listdir(d) if "tmp" in n]


def _assert_same_run(want, got, files, checkpoints):
  for name in files:
    assert _rows(got / name) == _rows(want / name), name
  for ckpt in checkpoints:
    (s1, a), (s2, b) = _checkpoint(want / ckpt), _checkpoint(got / ckpt)
    assert s1 == s2 and len(a) == len(b), ckpt
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y, err_msg=ckpt)
  assert not _tmp_checkpoints(got)  # the killed commits' leftovers were cleaned up


def _interrupt(run, workdir, plan) -> list[int]:
  """Runs `plan`, then the job to the end; returns the exit codes of the plan's runs.

  Steps: ("commit", n): SIGKILL inside the n-th checkpoint commit; (signal name,
  metrics file, k, delay_s): the signal once that file has k rows, plus the delay.
  """
  codes = []
  for how, *arg in plan:
    run.log(f"{how} {arg}")
    if how == "commit":
      rc = run.start(commit_kill=arg[0]).wait(timeout=600)
      run.log(f"exit {rc}")
      codes.append(rc)
      assert rc in (0, -signal.SIGKILL), run.tail()  # 0: it had fewer commits left
      if rc:  # killed after writing a step, before publishing it: not taken as complete
        assert _tmp_checkpoints(workdir), run.tail()
      continue
    name, k, delay = arg
    started = time.time()
    proc = run.start()
    # k rows written by this attempt (a restart first drops the rows past its checkpoint).
    while proc.poll() is None and not (_mtime(workdir / name) > started
                                       and _count_rows(workdir / name) >= k):
      time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
      proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=600)
    run.log(f"exit {rc}")
    codes.append(rc)
    if how == "SIGKILL":
      assert rc in (0, -signal.SIGKILL), run.tail()
    else:  # 143: saved a checkpoint and exited (-15: outside the training loops)
      assert rc in (0, 143, -signal.SIGTERM), run.tail()
      if rc == 143:
        assert not _tmp_checkpoints(workdir)
  run.log("to the end")
  run.to_end()
  return codes


@pytest.fixture(scope="module")
def micro_setup(tmp_path_factory):
  """A tokenizer, a compilation cache and the uninterrupted micro run."""
  from r1jax.data import tinyworld
  from r1jax.data.tokenizer import train_sentencepiece
  root = tmp_path_factory.mktemp("preempt-micro")
  tokenizer = train_sentencepiece(tinyworld.pretraining_corpus(2000, seed=0), root / "tw",
                                  vocab_size=640)
  env = _env(root / "jax-cache")
  _micro_run(root / "straight", tokenizer, env, root / "straight.log").to_end()
  return root / "straight", tokenizer, env


def test_killed_in_a_commit_and_at_random_moments_then_resumed(micro_setup, tmp_path):
  straight, tokenizer, env = micro_setup
  workdir = tmp_path / "w"
  rng = random.Random(0)
  run = _micro_run(workdir, tokenizer, env, tmp_path / "run.log")
  codes = _interrupt(run, workdir, [
      ("commit", 2),  # inside the commit of GRPO step 2
      ("SIGKILL", "metrics.jsonl", 2, rng.uniform(0.0, 0.1)),  # steps take ~0.1 s here
      ("SIGTERM", "metrics.jsonl", 3, rng.uniform(0.0, 0.1))])
  assert codes[:2] == [-signal.SIGKILL] * 2 and codes[2] != 0, codes  # every one interrupted
  rows = _rows(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once, though several were redone
  _assert_same_run(straight, workdir, ["metrics.jsonl", "samples.jsonl"], ["checkpoints"])


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("preempt-cli")
  env = _env(root / "jax-cache")
  _cli_run(root / "straight", env, root / "straight.log").to_end()
  return root / "straight", env


@pytest.mark.slow
def test_cli_pipeline_killed_many_times_then_resumed(cli_setup, tmp_path):
  straight, env = cli_setup
  workdir = tmp_path / "w"
  rng = random.Random(1)
  delay = lambda: rng.uniform(0.0, 1.5)
  _interrupt(_cli_run(workdir, env, tmp_path / "run.log"), workdir, [
      ("commit", 2),  # the base's last checkpoint commit
      ("SIGKILL", "base/metrics.jsonl", 1, delay()),  # the base's last row: during its eval
      ("commit", 2),  # GRPO step 2
      ("SIGTERM", "metrics.jsonl", 2, delay()),
      ("SIGKILL", "metrics.jsonl", 3, delay()),
      ("SIGKILL", "metrics.jsonl", 4, delay()),  # during the final evaluation
  ])
  _assert_same_run(straight, workdir, ["metrics.jsonl", "samples.jsonl", "base/metrics.jsonl"],
                   ["checkpoints", "base/checkpoints"])
  results = [_strip(json.load(open(d / "results.json"))) for d in (straight, workdir)]
  assert results[0]["after"] == results[1]["after"]
  assert results[0]["before"] == results[1]["before"]

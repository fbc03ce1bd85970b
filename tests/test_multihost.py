"""Multi-host through jax.distributed: two local processes x 4 CPU devices
(coordinator on localhost) run a GRPO step — sampler on the shared sharded
params, rewards scored per host and gathered, each host feeding its own rows —
and an orbax save/restore by both processes, and agree with one process
holding all 8 devices. tests/multihost_driver.py is the program; this test
starts it, waits with a deadline and kills whatever is left."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "multihost_driver.py")
# LLVM's optimisation level does not touch what is under test; level 0 halves
# the compile time of every process.
XLA = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  from r1jax.data import tinyworld
  from r1jax.data.tokenizer import train_sentencepiece
  return train_sentencepiece(tinyworld.pretraining_corpus(2000, seed=0),
                             tmp_path_factory.mktemp("spm") / "tw", vocab_size=640)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_all(mode: str, tmp_path, tokenizer_path, timeout: float = 420):
  """Starts the 2-process run and the 1-process reference side by side; returns
  their output directories. Every process is killed on the way out."""
  port = _free_port()
  runs = {"multi": [dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(i), XLA_FLAGS=XLA + "4") for i in range(2)],
          "single": [dict(XLA_FLAGS=XLA + "8")]}
  procs, logs = [], []
  try:
    for name, envs in runs.items():
      out = tmp_path / name
      out.mkdir()
      for i, extra in enumerate(envs):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(extra, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
        log = open(tmp_path / f"{name}_{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, DRIVER, mode, str(tmp_path / f"{name}_workdir"),
             str(tokenizer_path), str(out)], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
    # One process failing leaves the other waiting on collectives: stop at the
    # first failure (or the deadline) and kill the rest below.
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for log in logs:
      log.close()
  codes = [p.returncode for p in procs]  # -9: killed here (deadline or another's failure)
  if codes != [0, 0, 0]:
    tails = {f.name: f.read_text()[-2500:] for f in sorted(tmp_path.glob("*.log"))}
    pytest.fail(f"exit codes {codes}\n" + "\n".join(f"--- {k}\n{v}" for k, v in tails.items()))
  return tmp_path / "multi", tmp_path / "single"


def _load(out):
  seen = [json.load(open(out / f"process_{i}.json")) for i in range(2)
          if (out / f"process_{i}.json").exists()]
  return dict(np.load(out / "result.npz", allow_pickle=False)), seen


def _params(result):
  return {k: v for k, v in result.items() if k.startswith("params")}


def test_two_processes_run_a_grpo_step_and_checkpoint_like_one(tmp_path, tokenizer_path):
  multi_dir, single_dir = _run_all("step", tmp_path, tokenizer_path)
  multi, seen = _load(multi_dir)
  single, [alone] = _load(single_dir)
  assert [s["process_index"] for s in seen] == [0, 1]
  for s in seen:
    assert s["process_count"] == 2 and s["local_devices"] == 4 and s["global_devices"] == 8
    assert s["restored_equal"] and s["meta_step"] == 1  # both hosts wrote and read it back
    assert s["restored_q_spec"] == "P('fsdp', 'tensor', None)"
    assert s["restored_q_local_shards"] == 4  # half the mesh's shards live on each host
  # Each host put only its own half of the 8 rows on its devices.
  assert [s["process_rows"] for s in seen] == [[0, 4], [4, 8]]
  assert alone["process_count"] == 1 and alone["process_rows"] == [0, 8]
  # Same rollout, same rewards (scored half per host, then gathered), same update.
  np.testing.assert_array_equal(multi["tokens"], single["tokens"])
  np.testing.assert_array_equal(multi["rewards"], single["rewards"])
  # The evaluation runner samples the same on two hosts as on one.
  assert seen[0]["eval_completions"] == seen[1]["eval_completions"] == alone["eval_completions"]
  assert len(alone["eval_completions"]) == 6
  assert float(np.std(single["rewards"])) > 0  # advantages (and the update) are not 0
  assert seen[0]["param_change"] > 1e-3  # the step moved the params
  np.testing.assert_allclose(multi["loss"], single["loss"], atol=1e-5)
  np.testing.assert_allclose(multi["grad_norm"], single["grad_norm"], rtol=1e-5)
  p_multi, p_single = _params(multi), _params(single)
  assert p_multi.keys() == p_single.keys() and len(p_multi) >= 10
  for k in p_single:
    np.testing.assert_allclose(p_multi[k], p_single[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_processes_run_the_grpo_loop_and_resume_like_one(tmp_path, tokenizer_path):
  """The real grpo.train loop (KL term, reference on the mesh): 1 step, checkpoint,
  restart for 2 steps (restore + step 2), on 2 processes and on 1."""
  multi_dir, single_dir = _run_all("loop", tmp_path, tokenizer_path, timeout=900)
  multi, seen = _load(multi_dir)
  single, [alone] = _load(single_dir)
  for s in seen:
    assert s["process_count"] == 2 and s["step"] == 2 and s["checkpoints"] == ["1", "2"]
  assert seen[1]["losses"] == []  # only process 0 writes metrics
  np.testing.assert_allclose(seen[0]["losses"], alone["losses"], atol=1e-5)
  np.testing.assert_allclose(seen[0]["rewards"], alone["rewards"], atol=1e-6)
  for k, v in _params(single).items():
    np.testing.assert_allclose(_params(multi)[k], v, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------
# r1jax.parallel.distributed in one process.
# ---------------------------------------------------------------------------

def test_initialize_is_a_noop_for_one_process_and_names_what_is_missing():
  from r1jax.errors import ConfigError
  from r1jax.parallel import distributed
  assert distributed.initialize(environ={}) is False
  assert distributed.initialize(environ={"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0",
                                         "JAX_COORDINATOR_ADDRESS": "localhost:1"}) is False
  with pytest.raises(ConfigError, match="missing: coordinator address, process id"):
    distributed.initialize(num_processes=2, environ={})
  with pytest.raises(ConfigError, match="process id 2 is outside"):
    distributed.initialize("localhost:1", 2, 2, environ={})
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two'"):
    distributed.initialize(environ={"JAX_NUM_PROCESSES": "two"})
  assert distributed._managed_multihost({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed._managed_multihost({"TPU_WORKER_HOSTNAMES": "a"}) is None  # one host


def test_one_process_scores_and_shards_everything():
  import jax
  from r1jax.parallel import distributed
  from r1jax.parallel.mesh import batch_sharding, make_mesh
  from r1jax.rewards import RewardRunner
  runner = RewardRunner({"len": (lambda p, c, r: float(len(c)), 0.5)}, workers=0)
  got = distributed.score_on_hosts(runner, ["p"] * 3, ["a", "bb", "ccc"], ["r"] * 3)
  np.testing.assert_array_equal(got[0], [0.5, 1.0, 1.5])
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  assert distributed.process_rows(6, batch_sharding(mesh)) == slice(0, 6)
  batch = distributed.shard_batch({"x": np.arange(6)}, batch_sharding(mesh))
  np.testing.assert_array_equal(distributed.fetch(batch)["x"], np.arange(6))

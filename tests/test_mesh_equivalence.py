"""Sharded equals unsharded on (data, fsdp, tensor, expert) meshes of 8 fake CPU
devices, for the tiny dense model and the tiny DeepSeek-V3 MoE: one SFT step
and one GRPO step give the loss and updated params (and MoE router biases) of
the single-device run (float32, <= 1e-5), every param is laid out as the
logical rules say (spec and per-device shard shape; routed experts split over
`expert`), the sampler runs on the trainer's sharded params and samples what
one device samples, and 3 steps compile once. One subprocess (XLA_FLAGS must be set before JAX starts) runs
every case: tests/mesh_equivalence_driver.py.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _key(case):
  return f"{case[0]}:{json.dumps(case[1], sort_keys=True)}"


# (model case of the driver, mesh axis sizes, also run the sampler on it).
# CI runs the four cases that cover every axis and both models; --runslow
# runs all eight (each model on each of the four meshes).
CASES = [
    ("dense", {"data": 2, "fsdp": 4}, False),
    ("dense", {"fsdp": 2, "tensor": 4}, True),
    ("moe", {"fsdp": 2, "tensor": 4}, False),
    ("moe", {"data": 2, "expert": 4}, True),
]
SLOW_CASES = [
    ("dense", {"data": 8}, False),
    ("dense", {"data": 2, "expert": 4}, False),
    ("moe", {"data": 8}, False),
    ("moe", {"data": 2, "fsdp": 4}, False),
]
ALL = [pytest.param(c, id=_key(c)) for c in CASES] + [
    pytest.param(c, id=_key(c), marks=pytest.mark.slow) for c in SLOW_CASES]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(request):
  """Runs the driver twice side by side (SFT + sampler, GRPO) and merges the cases."""
  cases = CASES + (SLOW_CASES if request.config.getoption("--runslow") else [])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             # LLVM's optimisation level does not touch the SPMD partitioning under
             # test; level 0 halves the compile time of the programs.
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "mesh_equivalence_driver.py"),
       json.dumps(cases), json.dumps(kinds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=REPO, env=env) for kinds in (["sft", "sample"], ["grpo"])]
  merged = {}
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=900)
      line = next((l for l in stdout.splitlines() if l.startswith("MESH_EQUIVALENCE ")), None)
      assert proc.returncode == 0 and line, stderr[-4000:]
      for key, r in json.loads(line[len("MESH_EQUIVALENCE "):]).items():
        merged.setdefault(key, {}).update(r)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return merged


@pytest.mark.parametrize("case", ALL)
def test_sharded_step_equals_single_device(results, case):
  r = results[_key(case)]
  for kind in ("sft", "grpo"):
    assert r[f"{kind}_param_change"] > 100 * TOL, (kind, r)  # the step moved the params
    assert r[f"{kind}_loss_diff"] <= TOL, (kind, r)
    assert r[f"{kind}_param_diff"] <= TOL, (kind, r)
    if case[0] == "moe":  # the router biases moved by the step, and identically
      assert r[f"{kind}_model_state_change"] > 100 * TOL, (kind, r)
      assert r[f"{kind}_model_state_diff"] <= TOL, (kind, r)
  if case[2]:
    assert r["sample_tokens_equal"] and r["sample_logprob_diff"] <= TOL, r
    assert len(set(r["sample_lengths"])) > 1  # rows stopped at different steps


@pytest.mark.parametrize("case", ALL)
def test_params_are_sharded_as_the_rules_say(results, case):
  r = results[_key(case)]
  assert {k: v for k, v in r["mesh"].items() if v > 1} == case[1]
  for kind in ("sft", "grpo"):  # after the jitted step: what out_shardings kept
    assert r[f"{kind}_layout_errors"] == [], "\n".join(r[f"{kind}_layout_errors"])


@pytest.mark.parametrize("case", ALL)
def test_adam_moments_are_sharded_like_their_params(results, case):
  r = results[_key(case)]
  for kind in ("sft", "grpo"):
    assert r[f"{kind}_opt_layout_errors"] == [], "\n".join(r[f"{kind}_opt_layout_errors"])


@pytest.mark.parametrize("case", ALL)
def test_three_steps_compile_once_on_a_mesh(results, case):
  r = results[_key(case)]
  assert r["sft_compiles"] == 1 and r["grpo_compiles"] == 1, r

"""GRPO trainer: the first on-policy update has loss ~0 but a real gradient,
and the R1-Zero smoke run through the real CLI writes its results and metrics."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import grpo
from r1jax.trainers.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_KEYS = ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean",
            "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
            "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "loss", "grad_norm", "sampling_tokens_per_sec", "train_tokens_per_sec")


def _gc(**kw):
  gc = ml_collections.ConfigDict(dict(
      beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_aggregation="seq_mean_token_mean",
      max_new_tokens=6, mask_truncated=False))
  gc.update(kw)
  return gc


def test_first_update_has_zero_loss_and_nonzero_gradient():
  mc = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   max_position_embeddings=128)
  model = Transformer(mc)
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  tx = optax.sgd(0.1)
  state, _ = create_train_state(model, tx, mesh, seed=0)
  rng = np.random.default_rng(0)
  G, N = 4, 6
  prompts = [rng.integers(3, 64, 5).tolist(), rng.integers(3, 64, 9).tolist()]
  tokens_BN = rng.integers(3, 64, (2 * G, N)).astype(np.int32)
  lengths = np.array([6, 3, 1, 6, 2, 5, 6, 4], np.int32)
  rewards_BG = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 1.5, 0.0, 0.0]], np.float32)
  adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards_BG))).reshape(-1)
  batch = grpo.build_batch(prompts, G, tokens_BN, np.zeros((2 * G, N), np.float32), lengths,
                           lengths < N, adv, pad_id=0)
  assert batch["mask"].sum() == lengths.sum()
  # π_old = the current policy, as right after sampling with μ = 1.
  logp = grpo.policy_logprobs(state.params, batch, model=model, temperature=1.0)
  batch["old_logp"] = np.where(batch["mask"] > 0, np.asarray(logp), 0.0).astype(np.float32)
  for beta in (0.0, 0.04):
    if beta:
      batch["ref_logp"] = batch["old_logp"]
    state_copy = jax.tree.map(jnp.copy, state)
    step = jax.jit(functools.partial(grpo.grpo_train_step, model=model,
                                     loss=grpo.make_loss(_gc(beta=beta)), tx=tx, temperature=1.0))
    _, m = step(state_copy, batch)
    assert abs(float(m["loss"])) < 1e-5, m  # ratio 1, zero-mean advantages per group
    assert float(m["grad_norm"]) > 1e-3, m
    assert abs(float(m["kl"])) < 1e-6 and float(m["clip_ratio/region_mean"]) == 0.0


def test_r1_zero_smoke_cli(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={REPO}/configs/r1_zero.py:smoke",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  for block in ("before", "after"):
    assert 0.0 <= results[block]["pass@1"] <= 1.0 and "format_rate" in results[block], results
  assert results["optimizer_steps"] == 3
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in TRL_KEYS:
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["completions/mean_length"] > 0
  assert os.path.getsize(tmp_path / "reward_curve.png") > 1000
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  assert {"prompt", "completion", "reward"} <= set(samples[0])

"""PPO as grpo.algorithm: the rollout's per-token advantages against a float64
GAE, the critic learning and surviving a resume, and what it costs over GRPO."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.errors import ConfigError
from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import grpo, ppo
from r1jax.trainers.state import create_train_state
from tests.test_grpo_trainer import _micro_train, _varied, micro_tokenizer  # noqa: F401


def _gae64(r, v, m, gamma, lam):
  B, T = r.shape
  adv = np.zeros((B, T))
  for b in range(B):
    last = 0.0
    for t in reversed(range(T)):
      if not m[b, t]:
        continue
      next_v = v[b, t + 1] if t + 1 < T and m[b, t + 1] else 0.0
      last = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + v) * m


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rollout_advantages_match_a_float64_gae(beta):
  mc = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   max_position_embeddings=128)
  model = Transformer(mc)
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  state, _ = create_train_state(model, optax.sgd(0.0), mesh, seed=0)
  rng = np.random.default_rng(0)
  G, N = 2, 6
  prompts = [rng.integers(3, 64, 5).tolist(), rng.integers(3, 64, 8).tolist()]
  tokens = rng.integers(3, 64, (2 * G, N)).astype(np.int32)
  lengths = np.array([6, 3, 1, 4], np.int32)
  old_logp = -np.abs(rng.normal(size=(2 * G, N))).astype(np.float32)
  batch = grpo.build_batch(prompts, G, tokens, old_logp, lengths, lengths < N,
                           np.zeros(2 * G, np.float32), pad_id=0)
  batch["rewards"] = np.array([1.0, 0.0, 1.5, -0.5], np.float32)
  batch["ref_logp"] = batch["old_logp"] + 0.1 * rng.normal(size=batch["mask"].shape).astype(
      np.float32) * batch["mask"]
  head = {"value": {"kernel": jnp.asarray(rng.normal(size=(32, 1)), jnp.float32),
                    "bias": jnp.asarray([0.3], jnp.float32)}}
  critic = {"backbone": state.params, "head": head}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  got = ppo.prepare(critic, {}, batch, model=model, gamma=0.97, lam=0.9, beta=beta,
                    whiten_adv=True)

  m = np.asarray(batch["mask"], np.float64)
  values = np.asarray(ppo.critic_values(critic, batch, model=model), np.float64) * m
  r = np.zeros_like(m)
  for b in range(m.shape[0]):
    last = np.nonzero(m[b])[0].max()
    r[b, last] = batch["rewards"][b]
  r -= beta * m * (np.asarray(batch["old_logp"], np.float64) - np.asarray(batch["ref_logp"]))
  adv, ret = _gae64(r, values, m, 0.97, 0.9)
  sel = m > 0
  want_adv = (adv - adv[sel].mean()) / adv[sel].std() * m
  assert np.abs(values[sel]).max() > 0.1  # the head is not zero: values enter the GAE
  np.testing.assert_allclose(got["old_values"], values, atol=1e-5)
  np.testing.assert_allclose(got["returns"], ret, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["advantages"], want_adv, rtol=1e-4, atol=1e-4)


def test_unknown_algorithm_is_a_config_error(tmp_path, micro_tokenizer):
  with pytest.raises(ConfigError, match="grpo.algorithm"):
    _micro_train(tmp_path, micro_tokenizer, algorithm="a2c")


def test_ppo_learns_its_critic_and_resumes_like_an_uninterrupted_run(tmp_path, micro_tokenizer):
  kw = dict(rewards={"varied": (_varied, 1.0)}, algorithm="ppo", updates_per_rollout=2)
  straight, rows = _micro_train(tmp_path / "straight", micro_tokenizer, num_steps=3, **kw)
  _micro_train(tmp_path / "resumed", micro_tokenizer, num_steps=2, **kw)
  resumed, resumed_rows = _micro_train(tmp_path / "resumed", micro_tokenizer, num_steps=3, **kw)
  assert [r["step"] for r in rows] == [r["step"] for r in resumed_rows] == [1, 2, 3]
  for key in ("reward", "loss", "value_loss", "policy_loss", "critic_grad_norm"):
    assert np.isfinite(rows[-1][key])
    np.testing.assert_allclose(resumed_rows[-1][key], rows[-1][key], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               resumed.params, straight.params)
  assert all(r["critic_grad_norm"] > 0 for r in rows)  # the critic is trained
  assert rows[0]["value_loss"] > 0
  # The critic doubles what the run holds: its params and Adam moments.
  _, grpo_rows = _micro_train(tmp_path / "grpo", micro_tokenizer, num_steps=1,
                              rewards={"varied": (_varied, 1.0)})
  ratio = rows[0]["memory/state_mib"] / grpo_rows[0]["memory/state_mib"]
  assert 1.9 < ratio < 2.1, ratio

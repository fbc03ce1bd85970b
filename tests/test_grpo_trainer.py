"""GRPO trainer: the first on-policy update has loss ~0 but a real gradient;
the loop's switches on a micro model. (The R1-Zero smoke run through the real
CLI is checked in tests/test_r1_pipeline.py, which runs it as R1's first step.)"""

import functools
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import grpo
from r1jax.trainers.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_KEYS = ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean",
            "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
            "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "loss", "grad_norm", "sampling_tokens_per_sec", "train_tokens_per_sec",
            # self-evolution metrics (issue 11)
            "completions/length/p50", "completions/length/p90", "reflection/rate",
            "reflection/changed_answer_rate", "accuracy/level_1")


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


# ---------------------------------------------------------------------------
# The loop itself, on a micro model (random init: rewards are mostly 0, which
# is all these tests need).
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_tokenizer(tmp_path_factory):
  from r1jax.data import tinyworld
  from r1jax.data.tokenizer import load_tokenizer, train_sentencepiece
  path = train_sentencepiece(tinyworld.pretraining_corpus(2000, seed=0),
                             tmp_path_factory.mktemp("spm") / "tw", vocab_size=640)
  return load_tokenizer(path)


def _micro_train(workdir, tok, rewards=None, loss_impl=None, train=None, **grpo_overrides):
  from r1jax.trainers.optim import make_optimizer
  spec = importlib.util.spec_from_file_location("r1_zero_config",
                                                os.path.join(REPO, "configs/r1_zero.py"))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  c = cfg.get_config("smoke")
  c.grpo.update(num_steps=2, prompts_per_step=2, num_generations=4, max_new_tokens=8,
                log_samples_every=0, eval_every=0)
  c.grpo.update(grpo_overrides)
  if loss_impl is not None:
    c.loss = ml_collections.ConfigDict({"impl": loss_impl})
  c.train.progress_bar = False
  c.train.checkpoint_every = 100
  c.train.update(train or {})
  c.optim.update(learning_rate=0.05, warmup_steps=0)
  model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=512))
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init, _ = create_train_state(model, optax.sgd(0.0), mesh, seed=0)
  tx = make_optimizer(c.optim, c.grpo.num_steps * grpo.updates_per_step(c.grpo))
  state = grpo.train(c, str(workdir), model=model, tokenizer=tok, mesh=mesh, tx=tx,
                     init_params=init.params, rewards=rewards)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return state, rows


def test_beta_zero_never_calls_the_reference_model(tmp_path, micro_tokenizer, monkeypatch):
  calls = []
  original = grpo.reference_logprobs

  def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(grpo, "reference_logprobs", counting)
  _micro_train(tmp_path / "b0", micro_tokenizer, beta=0.0)
  assert calls == []
  _, rows = _micro_train(tmp_path / "b1", micro_tokenizer, beta=0.04, num_minibatches=2)
  assert len(calls) == 2 * 2  # once per mini-batch and step, before the updates
  assert all(np.isfinite(r["kl"]) for r in rows)


def test_mu_above_one_reuses_the_old_logprobs_of_sampling_time(tmp_path, micro_tokenizer,
                                                               monkeypatch):
  seen = []
  original = grpo.grpo_train_step

  def spy(state, batch, **kwargs):
    new_state, metrics = original(state, batch, **kwargs)
    jax.debug.callback(lambda old, ratio: seen.append((np.asarray(old), float(ratio))),
                       batch["old_logp"], metrics["ratio/mean"])
    return new_state, metrics

  monkeypatch.setattr(grpo, "grpo_train_step", spy)
  state, rows = _micro_train(tmp_path, micro_tokenizer, rewards={"varied": (_varied, 1.0)},
                             updates_per_rollout=3)
  assert int(state.step) == 2 * 3 and len(seen) == 6
  for step in range(2):
    olds = [old for old, _ in seen[3 * step:3 * step + 3]]
    for old in olds[1:]:  # every epoch sees the sampler's log-probs, not recomputed ones
      np.testing.assert_array_equal(old, olds[0])
    ratios = [r for _, r in seen[3 * step:3 * step + 3]]
    assert abs(ratios[0] - 1.0) < 1e-3, ratios  # first epoch: on-policy, ratio 1
    assert abs(ratios[2] - 1.0) > 1e-3, ratios  # the policy moved, pi_old did not
  assert [r["step"] for r in rows] == [1, 2]


def test_chunked_loss_kernel_gives_the_reference_run(tmp_path, micro_tokenizer, monkeypatch):
  """loss.impl=chunked (logits never materialised) reproduces loss.impl=reference step by step."""
  from r1jax.kernels import logprob_chunked
  traced = []
  original = logprob_chunked.forward

  def counting(*args, **kwargs):
    traced.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(logprob_chunked, "forward", counting)
  kw = dict(rewards={"varied": (_varied, 1.0)}, beta=0.04, updates_per_rollout=2)
  _, want = _micro_train(tmp_path / "reference", micro_tokenizer, loss_impl="reference", **kw)
  assert traced == []  # the switch reaches the step: the reference run never streams
  _, got = _micro_train(tmp_path / "chunked", micro_tokenizer, loss_impl="chunked", **kw)
  assert traced
  assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
  assert any(abs(r["loss"]) > 1e-3 for r in want)  # mu = 2: off-policy, the loss is not ~0
  for g, w in zip(got, want):
    for key in ("loss", "grad_norm", "kl", "entropy", "ratio/mean", "clip_ratio/region_mean",
                "reward", "completions/mean_length"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _varied(prompt, completion, reference):
  """Differs between completions, so advantages (and gradients) are not 0."""
  return float(len(completion) % 3)


def _raises(prompt, completion, reference):
  raise RuntimeError("reward bug")


def _hangs(prompt, completion, reference):
  time.sleep(3600)  # far beyond any load-induced slowness: waiting for it would show
  return 1.0


def test_reward_that_raises_or_hangs_scores_zero_and_training_goes_on(tmp_path,
                                                                      micro_tokenizer):
  from r1jax.rewards import accuracy_reward_fn, format_reward_fn
  rewards = {"accuracy": (accuracy_reward_fn, 1.0), "format": (format_reward_fn, 0.5),
             "boom": (_raises, 1.0), "hang": (_hangs, 1.0)}
  start = time.monotonic()
  state, rows = _micro_train(tmp_path, micro_tokenizer, rewards=rewards, num_steps=1,
                             num_generations=2, reward_workers=2, reward_timeout_s=0.5)
  # Waiting for the hangs would take 2 x 3600 s; the run itself takes ~30 s alone
  # (minutes on a loaded machine).
  assert time.monotonic() - start < 900
  assert int(state.step) == 1 and [r["step"] for r in rows] == [1]
  row = rows[0]
  assert row["rewards/boom/errors"] == 4 and row["rewards/boom/mean"] == 0.0
  assert row["rewards/hang/timeouts"] == 4 and row["rewards/hang/mean"] == 0.0
  assert row["rewards/accuracy/errors"] == row["rewards/accuracy/timeouts"] == 0
  assert np.isfinite(row["loss"]) and np.isfinite(row["reward"])

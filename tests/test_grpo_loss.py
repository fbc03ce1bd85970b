"""GRPO loss and advantages against an independent float64 NumPy reference."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.losses.grpo import GRPOLoss, group_advantages, token_logprobs

B, T, L = 8, 12, 16  # batch, padded completion length, max_completion_length


def make_inputs(seed=0):
  """Random rollout batch: varied lengths (one fully masked row), ratios on both clip sides."""
  rng = np.random.default_rng(seed)
  lengths = np.array([T, 1, 5, 0, 9, T, 3, 7])
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  logp = -rng.uniform(0.1, 3.0, (B, T))
  # log-ratios in [-0.6, 0.6]: ρ from 0.55 to 1.8, so both 0.8 and 1.2/1.28 are crossed.
  old = logp - rng.uniform(-0.6, 0.6, (B, T))
  ref = logp + rng.normal(0, 0.3, (B, T))
  adv = rng.normal(0, 1, B)
  adv[2] = -abs(adv[2]); adv[5] = abs(adv[5])
  truncated = np.array([True, False, False, False, True, False, False, False])
  # Garbage on padding must not matter (nor make NaNs).
  pad = mask == 0
  logp[pad], old[pad], ref[pad] = -1e30, 50.0, np.inf
  f32 = lambda x: np.asarray(x, np.float32)
  return f32(logp), f32(old), f32(ref), f32(adv), mask, truncated


def numpy_grpo(logp, old, ref, adv, mask, truncated, *, beta, eps_low, eps_high,
               agg, max_len, mask_truncated):
  """float64 loss, d loss / d logp and metrics straight from the formula."""
  logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
  m = np.asarray(mask, np.float64).copy()
  if mask_truncated:
    m[np.asarray(truncated)] = 0.0
  # Padding values are arbitrary: replace them so no inf/NaN leaks through 0 * x.
  logp, old, ref = (np.where(m > 0, x, 0.0) for x in (logp, old, ref))
  A = adv[:, None] * np.ones_like(logp)
  rho = np.exp(logp - old)
  unclipped, clipped = rho * A, np.clip(rho, 1 - eps_low, 1 + eps_high) * A
  surr = np.minimum(unclipped, clipped)
  # The clipped branch is the (strictly) active one, with zero gradient, exactly when:
  clip_active = ((A > 0) & (rho > 1 + eps_high)) | ((A < 0) & (rho < 1 - eps_low))
  dsurr = np.where(clip_active, 0.0, rho * A)
  if beta > 0:
    kl = np.exp(ref - logp) - (ref - logp) - 1
    dkl = 1.0 - np.exp(ref - logp)
  else:
    kl = dkl = np.zeros_like(logp)
  obj, dobj = surr - beta * kl, dsurr - beta * dkl

  # Per-token weights w such that objective = Σ w · obj.
  w = np.zeros_like(logp)
  if agg == "seq_mean_token_mean":
    rows = [b for b in range(B) if m[b].sum() > 0]
    for b in rows:
      w[b] = m[b] / m[b].sum() / len(rows)
  elif agg == "token_mean":
    w = m / m.sum()
  else:
    w = m / max_len / B
  loss = -np.sum(w * obj)
  grad = -w * dobj

  n = m.sum()
  low = (A < 0) & (rho < 1 - eps_low)
  high = (A > 0) & (rho > 1 + eps_high)
  metrics = {"kl": (kl * m).sum() / n, "clip_ratio/low_mean": (low * m).sum() / n,
             "clip_ratio/high_mean": (high * m).sum() / n,
             "clip_ratio/region_mean": ((low | high) * m).sum() / n,
             "ratio/mean": (rho * m).sum() / n}
  return loss, grad, metrics


def jax_grpo(module, logp, old, ref, adv, mask, truncated):
  def f(lp):
    return module.apply({}, lp, jnp.asarray(old), None if ref is None else jnp.asarray(ref),
                        jnp.asarray(adv), jnp.asarray(mask), jnp.asarray(truncated))
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  return loss, grad, metrics


@pytest.mark.parametrize("agg,beta,eps,mask_truncated", list(itertools.product(
    ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"], [0.0, 0.04],
    [(0.2, 0.2), (0.2, 0.28)], [False, True])))
def test_loss_and_grad_match_numpy(agg, beta, eps, mask_truncated):
  logp, old, ref, adv, mask, truncated = make_inputs()
  kw = dict(beta=beta, eps_low=eps[0], eps_high=eps[1], agg=agg, max_len=L,
            mask_truncated=mask_truncated)
  want_loss, want_grad, want_metrics = numpy_grpo(logp, old, ref, adv, mask, truncated, **kw)
  module = GRPOLoss(beta=beta, epsilon_low=eps[0], epsilon_high=eps[1], loss_aggregation=agg,
                    max_completion_length=L, mask_truncated=mask_truncated)
  loss, grad, metrics = jax_grpo(module, logp, old, ref if beta > 0 else None, adv, mask,
                                 truncated)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
  scale = np.abs(want_grad).max()
  assert scale > 0
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6 * scale)
  assert np.all(np.asarray(grad)[want_grad == 0] == 0)  # masked / clipped tokens: no gradient
  for k, v in want_metrics.items():
    assert metrics[k].dtype == jnp.float32 and metrics[k].shape == ()
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_inputs_hit_both_clip_sides():
  """Guards the parity test's coverage: both clip regions and unclipped tokens occur."""
  logp, old, ref, adv, mask, truncated = make_inputs()
  for eps_high in (0.2, 0.28):
    _, _, mt = numpy_grpo(logp, old, ref, adv, mask, truncated, beta=0.0, eps_low=0.2,
                          eps_high=eps_high, agg="token_mean", max_len=L, mask_truncated=True)
    assert mt["clip_ratio/low_mean"] > 0 and mt["clip_ratio/high_mean"] > 0
    assert mt["clip_ratio/region_mean"] < 1
  # clip-higher changes which tokens are clipped on these inputs.
  m1 = numpy_grpo(logp, old, ref, adv, mask, truncated, beta=0.0, eps_low=0.2, eps_high=0.2,
                  agg="token_mean", max_len=L, mask_truncated=False)[2]
  m2 = numpy_grpo(logp, old, ref, adv, mask, truncated, beta=0.0, eps_low=0.2, eps_high=0.28,
                  agg="token_mean", max_len=L, mask_truncated=False)[2]
  assert m2["clip_ratio/high_mean"] < m1["clip_ratio/high_mean"]


def test_clip_metrics_hand_example():
  # ρ = [0.5, 1.0, 1.5, 0.5] with A = [-1, -1, +1, +1]: low, none, high, none.
  logp = jnp.log(jnp.array([[0.5, 1.0, 1.5, 0.5]]))
  ones = jnp.ones((1, 4))
  module = GRPOLoss(beta=0.0, loss_aggregation="token_mean")
  for adv, low, high in ((-1.0, 0.5, 0.0), (1.0, 0.0, 0.25)):
    _, mt = module.apply({}, logp, jnp.zeros((1, 4)), None, jnp.array([adv]), ones)
    assert float(mt["clip_ratio/low_mean"]) == low
    assert float(mt["clip_ratio/high_mean"]) == high
    assert float(mt["clip_ratio/region_mean"]) == low + high
    np.testing.assert_allclose(float(mt["ratio/mean"]), 0.875, rtol=1e-6)


@pytest.mark.parametrize("value", [0.1, 1.0, 0.7, -3.3, 1e-3])
@pytest.mark.parametrize("G", [3, 7, 16])
def test_equal_rewards_give_exactly_zero(value, G):
  r = jnp.full((2, G), value, jnp.float32)
  for scale in (True, False):
    for ddof in (0, 1):
      a = np.asarray(group_advantages(r, scale_by_std=scale, std_ddof=ddof))
      assert np.all(a == 0.0), (scale, ddof, a)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("ddof", [0, 1])
def test_advantages_match_numpy(scale_by_std, ddof):
  rng = np.random.default_rng(1)
  r = rng.normal(2.0, 1.5, (5, 16)).astype(np.float32)
  r[3] = rng.integers(0, 2, 16)  # 0/1 accuracy rewards
  r64 = r.astype(np.float64)
  want = r64 - r64.mean(1, keepdims=True)
  if scale_by_std:
    want = want / (r64.std(1, ddof=ddof, keepdims=True) + 1e-4)
  got = group_advantages(jnp.asarray(r), scale_by_std=scale_by_std, std_ddof=ddof)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ref_none():
  logp, old, ref, adv, mask, truncated = make_inputs()
  loss, _ = GRPOLoss(beta=0.0).apply({}, logp, old, None, adv, mask)
  assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match="ref_logp_BT is None.*beta"):
    GRPOLoss(beta=0.04).apply({}, logp, old, None, adv, mask)


def test_config_validation():
  with pytest.raises(ValueError, match="loss_aggregation"):
    GRPOLoss(loss_aggregation="sum")
  with pytest.raises(ValueError, match="max_completion_length"):
    GRPOLoss(loss_aggregation="seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="epsilon_low"):
    GRPOLoss(epsilon_low=1.5)
  with pytest.raises(ValueError, match="beta"):
    GRPOLoss(beta=-1.0)
  logp, old, ref, adv, mask, _ = make_inputs()
  with pytest.raises(ValueError, match="truncated_B"):
    GRPOLoss(mask_truncated=True).apply({}, logp, old, ref, adv, mask)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_mu1_ratio_one_value_is_minus_mean_advantage_grad_nonzero(agg):
  rng = np.random.default_rng(2)
  adv = np.asarray(group_advantages(jnp.asarray(rng.normal(size=(2, 4)), jnp.float32))).ravel()
  logp = jnp.asarray(-rng.uniform(0.1, 2.0, (8, T)), jnp.float32)
  mask = jnp.ones((8, T))  # equal lengths
  module = GRPOLoss(beta=0.0, loss_aggregation=agg, max_completion_length=L)

  def f(lp):  # old_logp is the same array, stop-gradiented inside: ρ ≡ 1
    return module.apply({}, lp, lp, None, jnp.asarray(adv), mask)
  (loss, mt), grad = jax.value_and_grad(f, has_aux=True)(logp)
  norm = {"seq_mean_token_sum_norm": T / L}.get(agg, 1.0)
  np.testing.assert_allclose(float(loss), -adv.mean() * norm, atol=1e-6)
  assert abs(float(loss)) < 1e-5
  assert float(mt["ratio/mean"]) == 1.0
  # Gradient is ∇ρ·A = A ∇logp: -A_b · w_bt per token, not zero.
  w = {"seq_mean_token_mean": 1 / (8 * T), "token_mean": 1 / (8 * T),
       "seq_mean_token_sum_norm": 1 / (8 * L)}[agg]
  np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * w * np.ones((8, T)), rtol=1e-5)
  assert np.abs(np.asarray(grad)).max() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_logprobs_temperature(temperature):
  rng = np.random.default_rng(3)
  logits_bf16 = jnp.asarray(rng.normal(0, 3, (2, 5, 11)), jnp.bfloat16)  # model output dtype
  logits = np.asarray(logits_bf16.astype(jnp.float32))
  tokens = rng.integers(0, 11, (2, 5))
  z = logits.astype(np.float64) / temperature
  lsm = z - z.max(-1, keepdims=True)
  lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
  want = np.take_along_axis(lsm, tokens[..., None], -1)[..., 0]
  got = token_logprobs(logits_bf16, jnp.asarray(tokens), temperature)
  assert got.dtype == jnp.float32 and got.shape == (2, 5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_jit_matches_eager():
  logp, old, ref, adv, mask, truncated = make_inputs()
  module = GRPOLoss(beta=0.04, epsilon_high=0.28, mask_truncated=True)
  eager, _ = module.apply({}, logp, old, ref, adv, mask, truncated)
  jitted, _ = jax.jit(module.apply)({}, logp, old, ref, adv, mask, truncated)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


# ---------------------------------------------------------------------------
# Gradient accumulation: micro-batches weighted by their share of the normaliser.
# ---------------------------------------------------------------------------

# The two normalisers that differ between chunks (kept sequences, kept tokens;
# truncated rows are masked out, so some chunks hold fewer of either).
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_micro_batched_step_equals_one_pass(aggregation):
  import optax
  from r1jax.models.config import ModelConfig
  from r1jax.models.transformer import Transformer
  from r1jax.parallel.mesh import make_mesh
  from r1jax.trainers import grpo
  from r1jax.trainers.state import create_train_state
  model = Transformer(ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64))
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  tx = optax.sgd(0.5)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, 61, n).tolist() for n in (3, 7, 5, 4)]
  G, N = 2, 6
  lengths = rng.integers(1, N + 1, 8).astype(np.int32)
  lengths[3] = N
  batch = grpo.build_batch(prompts, G, rng.integers(2, 61, (8, N)).astype(np.int32),
                           rng.normal(-4.0, 0.3, (8, N)).astype(np.float32), lengths,
                           lengths < N, rng.normal(0, 1, 8).astype(np.float32), pad_id=0)
  loss = grpo.GRPOLoss(beta=0.0, loss_aggregation=aggregation, max_completion_length=N,
                       mask_truncated=True)
  out = {}
  for m in (1, 4):
    state, _ = create_train_state(model, tx, mesh, 0)
    step = jax.jit(lambda s, b, m=m: grpo.grpo_train_step(s, b, model=model, loss=loss, tx=tx,
                                                         temperature=1.0, micro_batches=m))
    new, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    out[m] = (float(metrics["loss"]), jax.device_get(new.params), jax.device_get(state.params))
  assert abs(out[1][0] - out[4][0]) < 1e-6, (out[1][0], out[4][0])
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[1][1]),
                                                         jax.tree.leaves(out[1][2])))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[4][1])):
    np.testing.assert_allclose(a, b, atol=2e-6)

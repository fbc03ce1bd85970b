"""PPO pieces against float64 references: GAE by an explicit backward loop,
the clipped policy/value objective and its gradient by a NumPy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.losses.ppo import PPOLoss, gae, whiten


def _gae_loop(r, v, lengths, gamma, lam):
  B, T = r.shape
  adv = np.zeros((B, T))
  for b in range(B):
    last = 0.0
    for t in reversed(range(lengths[b])):
      next_v = v[b, t + 1] if t + 1 < lengths[b] else 0.0
      delta = r[b, t] + gamma * next_v - v[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  ret = adv + np.where(np.arange(T)[None] < np.asarray(lengths)[:, None], v, 0.0)
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_a_float64_loop(gamma, lam):
  rng = np.random.default_rng(0)
  B, T = 4, 9
  lengths = [9, 5, 1, 0]
  mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.float32)
  r = np.zeros((B, T), np.float64)
  for b, n in enumerate(lengths):  # sparse: the sequence reward on the last token,
    if n:
      r[b, n - 1] = rng.normal()
  r += rng.normal(size=(B, T)) * 0.01 * mask  # plus a per-token (KL-like) term
  v = rng.normal(size=(B, T))
  # Junk beyond each row's end must not leak into anything.
  r_junk, v_junk = r + 100 * (1 - mask), v + 100 * (1 - mask)
  adv, ret = gae(jnp.asarray(r_junk, jnp.float32), jnp.asarray(v_junk, jnp.float32),
                 jnp.asarray(mask), gamma=gamma, lam=lam)
  want_adv, want_ret = _gae_loop(r, v, lengths, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret * mask, rtol=1e-5, atol=1e-5)
  if lam == 1.0 and gamma == 0.9:  # λ=1: advantages are discounted returns minus values
    disc = np.zeros((B, T))
    for b, n in enumerate(lengths):
      g = 0.0
      for t in reversed(range(n)):
        g = r[b, t] + gamma * g
        disc[b, t] = g
    np.testing.assert_allclose(ret, disc, rtol=1e-5, atol=1e-5)


def test_whiten_is_zero_mean_unit_variance_on_the_mask():
  x = jnp.arange(12.0).reshape(3, 4)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
  w = np.asarray(whiten(x, mask))
  sel = w[np.asarray(mask) > 0]
  np.testing.assert_allclose(sel.mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(sel.std(), 1.0, atol=1e-5)
  assert np.all(w[np.asarray(mask) == 0] == 0)


def _ppo_numpy(logp, old_logp, adv, v, old_v, ret, m, eps, veps, c):
  ratio = np.exp(logp - old_logp)
  pg = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
  vc = old_v + np.clip(v - old_v, -veps, veps)
  vf = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
  n = m.sum()
  return np.sum(pg * m) / n + c * np.sum(vf * m) / n


def test_ppo_loss_and_gradients_match_float64():
  rng = np.random.default_rng(2)
  B, T = 3, 7
  f64 = lambda *s: rng.normal(size=s)
  old_logp = -np.abs(f64(B, T))
  logp = old_logp + 0.4 * f64(B, T)  # ratios well outside [0.8, 1.2] too
  adv, old_v, ret = f64(B, T), f64(B, T), f64(B, T)
  v = old_v + 0.4 * f64(B, T)
  m = (rng.random((B, T)) > 0.25).astype(np.float64)
  loss = PPOLoss(epsilon=0.2, value_clip=0.2, vf_coef=0.5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def f(lp, vv):
    return loss.apply({}, lp, f32(old_logp), f32(adv), vv, f32(old_v), f32(ret), f32(m))[0]

  ref = lambda lp, vv: _ppo_numpy(lp, old_logp, adv, vv, old_v, ret, m, 0.2, 0.2, 0.5)
  np.testing.assert_allclose(f(f32(logp), f32(v)), ref(logp, v), rtol=1e-5)
  g_lp, g_v = jax.grad(f, argnums=(0, 1))(f32(logp), f32(v))
  eps = 1e-6
  for grad, which in ((g_lp, 0), (g_v, 1)):
    for idx in [(0, 0), (1, 3), (2, 6)]:
      d = np.zeros((B, T))
      d[idx] = eps
      args_p = (logp + d, v) if which == 0 else (logp, v + d)
      args_m = (logp - d, v) if which == 0 else (logp, v - d)
      fd = (ref(*args_p) - ref(*args_m)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-3, atol=1e-6)

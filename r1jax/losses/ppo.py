"""PPO for language models (the baseline GRPO replaces, DeepSeekMath §4.1):
generalised advantage estimation over completion tokens and the clipped
policy + value objective.

Rewards arrive per token (the rule reward on a completion's last token, an
optional per-token KL penalty); the critic predicts a value per token; the
state after a completion's last token is terminal (value 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, *,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) per completion token.

  A_t = Σ_k (γλ)^k δ_{t+k},  δ_t = r_t + γ V_{t+1} - V_t, with V = 0 after the
  last real token (mask_BT marks real tokens: a prefix of each row).
  Returns (advantages_BT, returns_BT = advantages + values), 0 off the mask.
  """
  m = mask_BT.astype(jnp.float32)
  r = rewards_BT.astype(jnp.float32) * m
  v = values_BT.astype(jnp.float32) * m
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta_BT = r + gamma * next_v - v

  def back(carry_B, x):
    delta_B, m_B = x
    adv_B = (delta_B + gamma * lam * carry_B) * m_B
    return adv_B, adv_B

  _, adv_TB = jax.lax.scan(back, jnp.zeros(r.shape[0], jnp.float32),
                           (delta_BT.T, m.T), reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, (adv_BT + v) * m


def whiten(x_BT: jax.Array, mask_BT: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked tokens of the batch (PPO's advantage normalisation)."""
  m = mask_BT.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  mean = jnp.sum(x_BT * m) / n
  var = jnp.sum(((x_BT - mean) * m) ** 2) / n
  return (x_BT - mean) * jax.lax.rsqrt(var + eps) * m


class PPOLoss(nn.Module):
  """Token-mean clipped surrogate + vf_coef × clipped value loss; no parameters.

  policy:  -min(ρ A, clip(ρ, 1-ε, 1+ε) A),  ρ = exp(logp - old_logp)
  value:   ½ max((V - R)², (clip(V, V_old - ε_v, V_old + ε_v) - R)²)
  """
  epsilon: float = 0.2
  value_clip: float = 0.2
  vf_coef: float = 0.1

  def __call__(self, logp_BT, old_logp_BT, advantages_BT, values_BT, old_values_BT,
               returns_BT, mask_BT) -> tuple[jax.Array, dict[str, jax.Array]]:
    m = mask_BT.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    sg = jax.lax.stop_gradient
    adv, old_logp, ret, old_v = (sg(x.astype(jnp.float32)) for x in
                                 (advantages_BT, old_logp_BT, returns_BT, old_values_BT))
    ratio = jnp.exp(logp_BT.astype(jnp.float32) - old_logp)
    clipped = jnp.clip(ratio, 1 - self.epsilon, 1 + self.epsilon)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    v = values_BT.astype(jnp.float32)
    v_clipped = old_v + jnp.clip(v - old_v, -self.value_clip, self.value_clip)
    vf = 0.5 * jnp.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)
    pg_loss = jnp.sum(pg * m) / n
    vf_loss = jnp.sum(vf * m) / n
    metrics = {"policy_loss": pg_loss, "value_loss": vf_loss,
               "clip_ratio": jnp.sum((jnp.abs(ratio - 1) > self.epsilon) * m) / n,
               "value_clip_ratio": jnp.sum((jnp.abs(v - old_v) > self.value_clip) * m) / n}
    return pg_loss + self.vf_coef * vf_loss, metrics

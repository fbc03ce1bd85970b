"""A scalar reward model: a decoder backbone and a linear score head on the
hidden state of each sequence's last real token (R1 stage 4)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class RewardModel(nn.Module):
  """score_B = w · hidden[b, last_index_B[b]] + bias.

  `backbone` is any r1jax decoder (`apply(..., return_hidden=True)` gives
  [B, T, D]); its params live under "backbone", so a policy checkpoint
  initialises it as is (`init_from_policy`). The head starts at zero: every
  answer scores 0 before training.
  """
  backbone: nn.Module

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None,
               last_index_B: Optional[jax.Array] = None) -> jax.Array:
    """Scores of B right-padded sequences; `last_index_B` = length - 1 (default T - 1)."""
    B, T = tokens_BT.shape
    if segment_ids_BT is None and last_index_B is not None:
      segment_ids_BT = (jnp.arange(T)[None, :] <= last_index_B[:, None]).astype(jnp.int32)
    hidden_BTD, _ = self.backbone(tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    if last_index_B is None:
      last_index_B = jnp.full((B,), T - 1, jnp.int32)
    h_BD = jnp.take_along_axis(hidden_BTD, last_index_B[:, None, None].astype(jnp.int32),
                               axis=1)[:, 0]
    score = nn.Dense(1, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                     param_dtype=jnp.float32, name="score")
    return score(h_BD.astype(jnp.float32))[:, 0]


def init_from_policy(policy_params, hidden_size: int) -> dict:
  """Reward-model params whose backbone is `policy_params` and whose head is zero."""
  return {"backbone": policy_params,
          "score": {"kernel": jnp.zeros((hidden_size, 1), jnp.float32),
                    "bias": jnp.zeros((1,), jnp.float32)}}


class ValueHead(nn.Module):
  """value_BT = w · hidden_BTD + b at every position: PPO's critic head on a
  decoder backbone (r1jax.trainers.ppo). Starts at zero, like the score head."""

  @nn.compact
  def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
    value = nn.Dense(1, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                     param_dtype=jnp.float32, name="value")
    return value(hidden_BTD.astype(jnp.float32))[..., 0]

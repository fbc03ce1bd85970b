"""Grouped-query attention with an optional functional KV cache."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from r1jax.models.config import ModelConfig
from r1jax.models.layers import Einsum, apply_rope, rope_inv_freq

_MASKED = -1e30  # finite so fully masked rows (padding) give uniform, not NaN


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer for every cache slot: [B, S, K, H] each."""

  k: jax.Array
  v: jax.Array


class Attention(nn.Module):
  """Causal multi-head attention with K <= N key/value heads (GQA)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array,
               cache: Optional[LayerCache] = None, cache_index: Optional[jax.Array] = None):
    c = self.config
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_size
    D = c.hidden_size
    proj = lambda eq, heads, axes, name: Einsum(
        eq, (D, heads, H), ("embed", *axes), c,
        bias_shape=(heads, H) if c.qkv_bias else None, bias_axes=axes, name=name)
    q_BTNH = proj("BTD,DNH->BTNH", N, ("heads", "head_dim"), "q_proj")(x_BTD)
    k_BTKH = proj("BTD,DKH->BTKH", K, ("kv_heads", "head_dim"), "k_proj")(x_BTD)
    v_BTKH = proj("BTD,DKH->BTKH", K, ("kv_heads", "head_dim"), "v_proj")(x_BTD)

    inv_freq = rope_inv_freq(c)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)

    new_cache = None
    if cache is not None:
      start = (0, cache_index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache.k, k_BTKH.astype(cache.k.dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(cache.v, v_BTKH.astype(cache.v.dtype), start)
      new_cache = LayerCache(k=k_BSKH, v=v_BSKH)
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH

    B, T = x_BTD.shape[:2]
    # XLA's fused attention handles GQA natively (K < N) without repeating k/v;
    # it ran ~1.6x faster than explicit einsums on CPU (fwd+bwd).
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH.astype(c.dtype), v_BSKH.astype(c.dtype), mask=mask_BTS[:, None],
        implementation="xla")
    out_BTNH = nn.with_logical_constraint(
        out_BTNH, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
    out_BTD = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), c,
                     name="o_proj")(out_BTNH)
    return out_BTD, new_cache

"""Grouped-query attention with an optional functional KV cache."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from r1jax.models.config import ModelConfig
from r1jax.models.layers import Einsum, rope_inv_freq, rope_sin_cos, rotate_half

_MASKED = -1e30  # finite so fully masked rows (padding) give uniform, not NaN


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer for every cache slot, head-major: keys
  [B, K, H, S] (transposed), values [B, K, S, H]. Both attention matmuls are
  then plain batched [G, H] x [H, S] and [G, S] x [S, H] products over (B, K)
  that read the cache in place; on CPU, keys stored [B, K, S, H] made the
  scores matmul 3.6x slower (benchmarks/sampler.py)."""

  k: jax.Array
  v: jax.Array


class Attention(nn.Module):
  """Causal multi-head attention with K <= N key/value heads (GQA)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array,
               cache: Optional[LayerCache] = None, cache_index: Optional[jax.Array] = None,
               prefix: Optional[tuple[LayerCache, jax.Array]] = None):
    """`prefix`: with a cache, a shared prompt prefix and its valid slots
    (`shared_prefix_attention`) that every row attends to before its cache."""
    c = self.config
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_size
    D = c.hidden_size
    proj = lambda eq, heads, axes, name: Einsum(
        eq, (D, heads, H), ("embed", *axes), c,
        bias_shape=(heads, H) if c.qkv_bias else None, bias_axes=axes, name=name)
    q_BTNH = proj("BTD,DNH->BTNH", N, ("heads", "head_dim"), "q_proj")(x_BTD)
    k_BTKH = proj("BTD,DKH->BTKH", K, ("kv_heads", "head_dim"), "k_proj")(x_BTD)
    v_BTKH = proj("BTD,DKH->BTKH", K, ("kv_heads", "head_dim"), "v_proj")(x_BTD)

    sin_cos = rope_sin_cos(positions_BT, rope_inv_freq(c))
    q_BTNH = rotate_half(q_BTNH, *sin_cos)
    k_BTKH = rotate_half(k_BTKH, *sin_cos)

    B, T = x_BTD.shape[:2]
    new_cache = None
    if cache is None:
      # Off CPU, XLA's attention handles GQA natively (K < N) without
      # repeating k/v; on CPU the halves below beat it (their docstring).
      if c.attention_impl == "cudnn":
        out_BTNH = one_sequence_attention(q_BTNH, k_BTKH, v_BTKH, implementation="cudnn")
      elif jax.default_backend() == "cpu":
        out_BTNH = causal_halves_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
      else:
        out_BTNH = jax.nn.dot_product_attention(
            q_BTNH, k_BTKH, v_BTKH, mask=mask_BTS[:, None], implementation="xla")
    else:
      # The barrier keeps RoPE and the bias out of the update's fusion: fused,
      # XLA on CPU rewrote the whole cache buffer per step instead of T slots.
      k_BKHT, v_BKTH = jax.lax.optimization_barrier(
          (k_BTKH.transpose(0, 2, 3, 1).astype(cache.k.dtype),
           v_BTKH.transpose(0, 2, 1, 3).astype(cache.v.dtype)))
      new_cache = LayerCache(
          k=jax.lax.dynamic_update_slice(cache.k, k_BKHT, (0, 0, 0, cache_index)),
          v=jax.lax.dynamic_update_slice(cache.v, v_BKTH, (0, 0, cache_index, 0)))
      k_BKHS, v_BKSH = new_cache.k.astype(c.dtype), new_cache.v.astype(c.dtype)
      if prefix is None:
        out_BTNH = _cached_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS)
      else:
        out_BTNH = shared_prefix_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS, *prefix)
    out_BTNH = nn.with_logical_constraint(
        out_BTNH, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
    out_BTD = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), c,
                     name="o_proj")(out_BTNH)
    return out_BTD, new_cache


def one_sequence_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *,
                           implementation: Optional[str]) -> jax.Array:
  """Causal attention with no mask tensor, for rows that each hold one
  right-padded sequence: a real position attends only to earlier positions,
  all real, so its output equals the segment-masked one; padding positions
  get finite values that the losses mask out. With cuDNN this is its plain
  causal flash attention; given jax's general [B, T, T] mask instead, the
  1.5B update's cuDNN variant had not finished after ~6 minutes on an H100."""
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                      implementation=implementation)


def causal_halves_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                            mask_BTS: jax.Array) -> jax.Array:
  """Masked attention whose first half of queries reads only the first half of
  the keys (the mask is causal: the rest are masked anyway), each half through
  `_grouped_attention`. The training path on CPU: bench-shaped forward +
  backward per layer ([128, 224] tokens, 4 query / 2 kv heads of 64, YNNPACK
  off as in updates) took 0.26 s against 0.39 s for
  jax.nn.dot_product_attention.
  Real positions get the masked result exactly; a fully masked (padding)
  query averages the keys of its half instead of all keys."""
  T = q_BTNH.shape[1]
  k_BKHS, v_BKSH = k_BTKH.transpose(0, 2, 3, 1), v_BTKH.transpose(0, 2, 1, 3)
  return jnp.concatenate(
      [_grouped_attention(q_BTNH[:, start:end], k_BKHS[..., :end], v_BKSH[:, :, :end],
                          mask_BTS[:, start:end, :end])
       for start, end in ((0, T // 2), (T // 2, T)) if end > start], axis=1)


def _cached_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                      mask_BTS: jax.Array) -> jax.Array:
  """Softmax attention of T queries over the S cache slots, reading the cache
  in its own layout (dot_product_attention on the cache transposed and
  repeated it every step: 1.5x the bytes of this path per decode step on CPU).
  Merging (B, K) into one batch axis would make XLA:CPU's matmuls 2x faster,
  but the reshape of the loop-carried cache made it copy the cache every
  decode step."""
  if q_BTNH.shape[1] == 1:
    return _decode_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS)
  return _grouped_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS)


def _grouped_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                       mask_BTS: jax.Array) -> jax.Array:
  """Softmax attention of T queries over S head-major keys/values, GQA's N/K
  query groups stacked as rows (M = (t, g)) of [B, K] batched products."""
  H, K = q_BTNH.shape[-1], k_BKHS.shape[1]
  q_BKMH = _query_rows(q_BTNH, K)
  logits_BKMS = jnp.einsum("BKMH,BKHS->BKMS", q_BKMH, k_BKHS,
                           preferred_element_type=jnp.float32) * (H ** -0.5)
  logits_BKMS = jnp.where(_row_mask(mask_BTS, q_BTNH.shape[2] // K), logits_BKMS, _MASKED)
  probs_BKMS = jax.nn.softmax(logits_BKMS, axis=-1).astype(v_BKSH.dtype)
  return _heads_from_rows(jnp.einsum("BKMS,BKSH->BKMH", probs_BKMS, v_BKSH), q_BTNH.shape)


def _query_rows(q_BTNH: jax.Array, K: int) -> jax.Array:
  """[B, T, N, H] queries as [B, K, M, H]: each kv head's T * N/K queries
  stacked as rows M = (t, query head within the group)."""
  B, T, N, H = q_BTNH.shape
  return q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * N // K, H)


def _heads_from_rows(out_BKMH: jax.Array, shape_BTNH: tuple) -> jax.Array:
  """The inverse of `_query_rows`."""
  B, T, N, H = shape_BTNH
  K = out_BKMH.shape[1]
  return out_BKMH.reshape(B, K, T, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def _row_mask(mask_BTS: jax.Array, group: int) -> jax.Array:
  """The [B, T, S] mask for `_query_rows`' rows, as [B, 1, M, S]."""
  return jnp.repeat(mask_BTS, group, axis=1)[:, None]


def _decode_attention(q_B1NH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                      mask_B1S: jax.Array) -> jax.Array:
  """One query per row (a decode step): both products as multiply-and-reduce
  over the cache (`_row_scores`, `_row_weighted`). Bench config, 4 layers:
  8.4 -> 4.0 ms per decode step on CPU (benchmarks/sampler.py: 2.19 ->
  1.86-1.98 s)."""
  q_BKGH = _query_rows(q_B1NH, k_BKHS.shape[1]).astype(jnp.float32)
  logits_BKGS = _row_scores(q_BKGH, k_BKHS, 1) * (q_B1NH.shape[-1] ** -0.5)
  logits_BKGS = jnp.where(mask_B1S[:, None], logits_BKGS, _MASKED)
  probs_BKGS = jax.lax.optimization_barrier(jax.nn.softmax(logits_BKGS, axis=-1))
  out_BKGH = _row_weighted(probs_BKGS, v_BKSH, 1)
  return _heads_from_rows(out_BKGH, q_B1NH.shape).astype(v_BKSH.dtype)


# How a decode step (one query per row) forms its per-row products: "reduce"
# (multiply-and-reduce, for XLA:CPU), "einsum" (batched matmuls, for GPUs:
# 2.85 -> 2.54 ms per decode step of the 1.5B model on an H100), or None: by
# backend. Several queries per row always use batched matmuls.
ROW_PRODUCTS = None


def _reduce_products(queries: int) -> bool:
  if queries > 1:
    return False
  return (ROW_PRODUCTS or ("reduce" if jax.default_backend() == "cpu" else "einsum")) == "reduce"


def _row_scores(q_BKMH: jax.Array, k_BKHS: jax.Array, queries: int) -> jax.Array:
  """Float32 q.k of each row's query rows, `queries` tokens per row. A decode
  step on CPU runs a multiply-and-reduce, not batched [M, H] x [H, S] matmuls
  that XLA:CPU runs as B*K tiny GEMMs; the barrier keeps the reduction out of
  the softmax's fusions (fused, XLA recomputed the scores for each of the
  softmax's passes)."""
  k_BKHS = k_BKHS.astype(jnp.float32)
  if _reduce_products(queries):
    return jax.lax.optimization_barrier(jnp.sum(q_BKMH[..., None] * k_BKHS[:, :, None], axis=-2))
  return jnp.einsum("BKMH,BKHS->BKMS", q_BKMH, k_BKHS)


def _row_weighted(probs_BKMS: jax.Array, v_BKSH: jax.Array, queries: int) -> jax.Array:
  """Float32 probs @ v of each row's query rows, as `_row_scores`."""
  v_BKSH = v_BKSH.astype(jnp.float32)
  if _reduce_products(queries):
    return jnp.sum(probs_BKMS[..., None] * v_BKSH[:, :, None], axis=-2)
  return jnp.einsum("BKMS,BKSH->BKMH", probs_BKMS, v_BKSH)


def shared_prefix_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                            mask_BTS: jax.Array, prefix: LayerCache,
                            prefix_valid_PS: jax.Array) -> jax.Array:
  """Attention of each row's T queries over its prompt's keys, then its own
  cache slots. Rows are prompt-major: rows p*G .. p*G+G-1 share prompt p's
  `prefix` (keys [P, K, H, S'], values [P, K, S', H]; `prefix_valid_PS` marks
  its real slots), which comes before every slot of their own caches. The
  prefix is read once per prompt, as one [G*T*N/K, H] x [H, S'] product per
  prompt and kv head, instead of once per row from G repeated copies.
  Equals attention over the concatenated [prefix; own] slots (the G samples
  of a prompt attend to the same prompt keys and values)."""
  B, T, N, H = q_BTNH.shape
  P, K = prefix.k.shape[0], k_BKHS.shape[1]
  G, M = B // P, T * (N // K)  # samples per prompt; query rows per (row, kv head)
  q_BKMH = _query_rows(q_BTNH, K).astype(jnp.float32)
  by_prompt = lambda x: x.reshape(P, G, K, M, -1).transpose(0, 2, 1, 3, 4).reshape(
      P, K, G * M, -1)
  by_row = lambda x: x.reshape(P, K, G, M, -1).transpose(0, 2, 1, 3, 4).reshape(B, K, M, -1)
  prefix_logits_BKMS = by_row(jnp.einsum(
      "PKMH,PKHS->PKMS", by_prompt(q_BKMH), prefix.k.astype(jnp.float32)))
  own_logits_BKMS = _row_scores(q_BKMH, k_BKHS, T)
  # One softmax over the [prefix; own] slots, computed in its two parts.
  scale = H ** -0.5
  prefix_mask_B1S = jnp.repeat(prefix_valid_PS, G, axis=0)[:, None]
  prefix_logits_BKMS = jnp.where(prefix_mask_B1S[:, None], prefix_logits_BKMS * scale, _MASKED)
  own_logits_BKMS = jnp.where(_row_mask(mask_BTS, N // K), own_logits_BKMS * scale, _MASKED)
  prefix_probs_BKMS, own_probs_BKMS = jax.lax.optimization_barrier(
      two_part_softmax(prefix_logits_BKMS, own_logits_BKMS))
  out_BKMH = by_row(jnp.einsum("PKMS,PKSH->PKMH", by_prompt(prefix_probs_BKMS),
                               prefix.v.astype(jnp.float32)))
  out_BKMH += _row_weighted(own_probs_BKMS, v_BKSH, T)
  return _heads_from_rows(out_BKMH, q_BTNH.shape).astype(v_BKSH.dtype)


def two_part_softmax(a_xS: jax.Array, b_xS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """softmax(concatenate([a, b], -1)) split back into its two parts, without
  materialising the concatenation."""
  max_x1 = jnp.maximum(a_xS.max(-1, keepdims=True), b_xS.max(-1, keepdims=True))
  exp_a, exp_b = jnp.exp(a_xS - max_x1), jnp.exp(b_xS - max_x1)
  total_x1 = exp_a.sum(-1, keepdims=True) + exp_b.sum(-1, keepdims=True)
  return exp_a / total_x1, exp_b / total_x1

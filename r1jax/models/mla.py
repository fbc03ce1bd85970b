"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a latent decode cache.

    q      = q_b(RMSNorm(q_a(x)))                   # [N, Hn + Hr] per head (or q_proj(x))
    c, k_r = split(kv_a(x), [R, Hr])                 # joint latent + one shared rope key
    c      = RMSNorm(c)
    k_n, v = split(kv_b(c), [Hn, Hv])                 # per-head nope keys and values
    score  = (q_n·k_n + rope(q_r)·rope(k_r)) * scale  # rope on the rope part only

The cache holds only `c` [B, S, R] and `rope(k_r)` [B, S, Hr] per layer (that
is the point of MLA: R + Hr numbers per token instead of N·(Hn + Hr + Hv)).
With a cache, attention runs in the "absorbed" form: kv_b's key half is
folded into the query (q_n·W_uk -> a query in latent space) and its value half
is applied after the attention-weighted sum of latents, so per-head keys and
values are never expanded over the S cache slots. Without a cache (training)
keys and values are expanded: cheaper when T = S. Both are the same function.

Letters: R kv latent rank, Q q latent rank; H head dims (Hn nope, Hr rope, Hv value).
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.models.attention import two_part_softmax
from r1jax.models.layers import Einsum, RMSNorm, param_init, rope_sin_cos, rotate_half

_MASKED = -1e30  # finite so fully masked rows (padding) give uniform, not NaN


@flax.struct.dataclass
class MLACache:
  """One layer's compressed decode state for every cache slot."""

  kv_latent: jax.Array  # [B, S, R]: RMS-normed joint kv latent
  k_rope: jax.Array  # [B, S, Hr]: the shared rope key, rotated


def yarn_active(config) -> bool:
  """YaRN applies when configured and the context is extended past the
  pretraining length (DeepSeek's inference code: max_seq_len > original_seq_len)."""
  return (config.rope_scaling_type == "yarn"
          and config.max_position_embeddings > config.rope_original_max_position_embeddings)


def _yarn_mscale(scale: float, mscale: float) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config) -> np.ndarray:
  """Inverse frequencies [Hr/2] of the rope part, YaRN-corrected when active (float32)."""
  dim, base = config.qk_rope_head_dim, config.rope_theta
  freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  if not yarn_active(config):
    return freqs.astype(np.float32)
  factor, old_len = config.rope_scaling_factor, config.rope_original_max_position_embeddings

  def correction_dim(rotations):
    return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
  high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  smooth = 1 - ramp  # 1: keep the frequency (extrapolate), 0: divide it by factor
  return (freqs / factor * (1 - smooth) + freqs * smooth).astype(np.float32)


def rope_attention_factor(config) -> float:
  """YaRN's scale on cos/sin: mscale(mscale) / mscale(mscale_all_dim); 1 for DeepSeek-V3."""
  if not yarn_active(config) or not config.rope_mscale_all_dim:
    return 1.0
  f = config.rope_scaling_factor
  return _yarn_mscale(f, config.rope_mscale) / _yarn_mscale(f, config.rope_mscale_all_dim)


def softmax_scale(config) -> float:
  """1/sqrt(Hn + Hr), times mscale² when YaRN extends the context."""
  scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
  if yarn_active(config):
    m = _yarn_mscale(config.rope_scaling_factor,
                     config.rope_mscale_all_dim or config.rope_mscale)
    scale *= m * m
  return scale


def apply_rope_interleaved(x_BTNH: jax.Array, sin_BTh: jax.Array, cos_BTh: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's complex-number
  layout) and returns them de-interleaved [evens' rotation, odds' rotation]:
  rotate-half of the de-interleaved dims.

  The output permutes the dims, identically for queries and keys, so q·k is
  that of the reference (transformers' `apply_rotary_pos_emb_interleave` does
  the same). Computed in float32.
  """
  evens_then_odds = jnp.concatenate([x_BTNH[..., 0::2], x_BTNH[..., 1::2]], axis=-1)
  return rotate_half(evens_then_odds, sin_BTh, cos_BTh)


def rope_tables(config, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """sin and cos [B, T, Hr/2] of the rope dims (`rope_sin_cos`), interleaved
  layouts scaled by YaRN's attention factor; computed once per layer, read by
  both q's and k's rotation."""
  sin_BTh, cos_BTh = rope_sin_cos(positions_BT, rope_inv_freq(config))
  factor = rope_attention_factor(config)
  if config.rope_interleave and factor != 1.0:
    return sin_BTh * factor, cos_BTh * factor
  return sin_BTh, cos_BTh


def rope(config, x_BTNH: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The configured rotary embedding (interleaved or rotate-half) of the rope
  dims, from `rope_tables`."""
  if config.rope_interleave:
    return apply_rope_interleaved(x_BTNH, *tables)
  out = rotate_half(x_BTNH, *tables)
  factor = rope_attention_factor(config)
  return out if factor == 1.0 else (out.astype(jnp.float32) * factor).astype(x_BTNH.dtype)


def _softmax(logits_BNTS: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
  return jax.nn.softmax(_masked_logits(logits_BNTS, mask_BTS, scale), axis=-1)


def _masked_logits(logits_BNTS: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
  """Scaled float32 logits, masked slots at _MASKED (mask [B, T or 1, S])."""
  return jnp.where(mask_BTS[:, None], logits_BNTS.astype(jnp.float32) * scale, _MASKED)


class Kernel(nn.Module):
  """A bare kernel param (for kv_b_proj, whose two halves are used apart)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  config: object

  @nn.compact
  def __call__(self) -> jax.Array:
    c = self.config
    return self.param("kernel", param_init(c, *self.axes), self.shape, c.param_dtype)


class MLA(nn.Module):
  """Multi-head latent attention; `config` is a DeepseekV3Config."""

  config: object

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array,
               cache: Optional[MLACache] = None, cache_index: Optional[jax.Array] = None,
               prefix: Optional[tuple[MLACache, jax.Array]] = None):
    """`prefix`: with a cache, a shared prompt prefix (MLACache of P prompts)
    and its valid slots [P, S'] that rows p*G .. p*G+G-1 attend to before
    their own slots (transformer.SharedPrefix)."""
    c = self.config
    D, N = c.hidden_size, c.num_attention_heads
    Hn, Hr, Hv, R = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)

    if c.q_lora_rank:
      Q = c.q_lora_rank
      q_BTQ = Einsum("BTD,DQ->BTQ", (D, Q), ("embed", "q_lora"), c, name="q_a_proj")(x_BTD)
      q_BTNH = Einsum("BTQ,QNH->BTNH", (Q, N, Hn + Hr), ("q_lora", "heads", "head_dim"), c,
                      name="q_b_proj")(norm("q_a_layernorm")(q_BTQ))
    else:
      q_BTNH = Einsum("BTD,DNH->BTNH", (D, N, Hn + Hr), ("embed", "heads", "head_dim"), c,
                      name="q_proj")(x_BTD)
    q_nope_BTNH, q_rope_BTNH = q_BTNH[..., :Hn], q_BTNH[..., Hn:]
    tables = rope_tables(c, positions_BT)
    q_rope_BTNH = rope(c, q_rope_BTNH, tables)

    kv_BTR = Einsum("BTD,DR->BTR", (D, R + Hr), ("embed", "kv_lora"), c,
                    name="kv_a_proj_with_mqa")(x_BTD)
    latent_BTR = norm("kv_a_layernorm")(kv_BTR[..., :R])
    k_rope_BTH = rope(c, kv_BTR[..., None, R:], tables)[:, :, 0]
    # kv_b as one [R, N, Hn + Hv] kernel (Hugging Face's kv_b_proj), split in use.
    kv_b_RNH = Kernel((R, N, Hn + Hv), ("kv_lora", "heads", "head_dim"), c,
                      name="kv_b_proj")().astype(c.dtype)
    w_uk_RNH, w_uv_RNH = kv_b_RNH[..., :Hn], kv_b_RNH[..., Hn:]
    scale = softmax_scale(c)

    if cache is None:  # expanded keys/values (T = S)
      k_nope_BSNH = jnp.einsum("BSR,RNH->BSNH", latent_BTR, w_uk_RNH)
      v_BSNH = jnp.einsum("BSR,RNH->BSNH", latent_BTR, w_uv_RNH)
      logits_BNTS = (jnp.einsum("BTNH,BSNH->BNTS", q_nope_BTNH, k_nope_BSNH)
                     + jnp.einsum("BTNH,BSH->BNTS", q_rope_BTNH, k_rope_BTH))
      probs_BNTS = _softmax(logits_BNTS, mask_BTS, scale).astype(c.dtype)
      out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)
      new_cache = None
    else:  # absorbed: attend in latent space over the cached slots
      start = (0, cache_index, 0)
      latent_BSR = jax.lax.dynamic_update_slice(
          cache.kv_latent, latent_BTR.astype(cache.kv_latent.dtype), start)
      k_rope_BSH = jax.lax.dynamic_update_slice(
          cache.k_rope, k_rope_BTH.astype(cache.k_rope.dtype), start)
      new_cache = MLACache(kv_latent=latent_BSR, k_rope=k_rope_BSH)
      latent_BSR, k_rope_BSH = latent_BSR.astype(c.dtype), k_rope_BSH.astype(c.dtype)
      q_latent_BTNR = jnp.einsum("BTNH,RNH->BTNR", q_nope_BTNH, w_uk_RNH)
      logits_BNTS = (jnp.einsum("BTNR,BSR->BNTS", q_latent_BTNR, latent_BSR)
                     + jnp.einsum("BTNH,BSH->BNTS", q_rope_BTNH, k_rope_BSH))
      if prefix is None:
        probs_BNTS = _softmax(logits_BNTS, mask_BTS, scale).astype(c.dtype)
        out_BTNR = jnp.einsum("BNTS,BSR->BTNR", probs_BNTS, latent_BSR)
      else:  # the prompt's slots first, read once per prompt for its G rows
        prefix_cache, prefix_valid_PS = prefix
        B, T, P, S = q_BTNH.shape[0], q_BTNH.shape[1], *prefix_valid_PS.shape
        by_prompt = lambda x: x.reshape(P, B // P, *x.shape[1:])
        prefix_latent_PSR = prefix_cache.kv_latent.astype(c.dtype)
        prefix_logits_BNTS = (
            jnp.einsum("PGTNR,PSR->PGNTS", by_prompt(q_latent_BTNR), prefix_latent_PSR)
            + jnp.einsum("PGTNH,PSH->PGNTS", by_prompt(q_rope_BTNH),
                         prefix_cache.k_rope.astype(c.dtype))).reshape(B, -1, T, S)
        prefix_mask_B1S = jnp.repeat(prefix_valid_PS, B // P, axis=0)[:, None]
        prefix_probs_BNTS, probs_BNTS = two_part_softmax(
            _masked_logits(prefix_logits_BNTS, prefix_mask_B1S, scale),
            _masked_logits(logits_BNTS, mask_BTS, scale))
        out_BTNR = (jnp.einsum("PGNTS,PSR->PGTNR", by_prompt(prefix_probs_BNTS.astype(c.dtype)),
                               prefix_latent_PSR).reshape(q_latent_BTNR.shape)
                    + jnp.einsum("BNTS,BSR->BTNR", probs_BNTS.astype(c.dtype), latent_BSR))
      out_BTNH = jnp.einsum("BTNR,RNH->BTNH", out_BTNR, w_uv_RNH)

    out_BTNH = nn.with_logical_constraint(
        out_BTNH, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
    out_BTD = Einsum("BTNH,NHD->BTD", (N, Hv, D), ("heads", "head_dim", "embed"), c,
                     name="o_proj")(out_BTNH)
    return out_BTD, new_cache

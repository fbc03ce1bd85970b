"""The dense decoder (Llama / Qwen2 family) as a Flax linen module.

`Transformer.apply(params, tokens_BT, positions_BT, segment_ids_BT, cache)`
returns `(logits_BTV, new_cache)`. Without a cache it is the training forward
(causal, with packed segments); with a `KVCache` it writes the new keys/values
at `cache.index` and attends to every valid slot before them (prefill and
decode are the same call).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from r1jax.models.attention import Attention, LayerCache
from r1jax.models.config import ModelConfig
from r1jax.models.layers import MLP, Einsum, RMSNorm, param_init

_ACT = ("activation_batch", "activation_length", "activation_embed")


@flax.struct.dataclass
class SharedPrefix:
  """Prompts' keys/values that groups of consecutive cache rows share: with P
  prompts and B rows, rows p*G .. p*G+G-1 (G = B / P) attend to prompt p's
  slots before their own. Per-layer caches of P rows (either model family's)."""

  layers: tuple
  valid_BS: jax.Array  # [P, S'] bool: the prompt's real (not padding) slots


@flax.struct.dataclass
class KVCache:
  """Decode state: per-layer keys/values, which slots hold real tokens, and
  the next slot to write (shared by the batch; left padding keeps rows aligned).
  With a `prefix`, every row first attends to its prompt's shared slots."""

  layers: tuple[LayerCache, ...]
  valid_BS: jax.Array  # bool
  index: jax.Array  # int32 scalar
  prefix: Optional[SharedPrefix] = None

  @property
  def max_length(self) -> int:
    return self.valid_BS.shape[1]


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
  """An empty cache of `max_length` slots for `batch` rows."""
  dtype = dtype or config.dtype
  K, H = config.num_key_value_heads, config.head_size
  layer = lambda: LayerCache(k=jnp.zeros((batch, K, H, max_length), dtype),  # keys transposed
                             v=jnp.zeros((batch, K, max_length, H), dtype))
  return KVCache(
      layers=tuple(layer() for _ in range(config.num_hidden_layers)),
      valid_BS=jnp.zeros((batch, max_length), bool),
      index=jnp.zeros((), jnp.int32))


class Block(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)); x + mlp(norm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, cache_index, prefix=None):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    h_BTD, new_cache = Attention(c, name="self_attn")(
        norm("input_layernorm")(x_BTD), positions_BT, mask_BTS, cache, cache_index, prefix)
    x_BTD = nn.with_logical_constraint(x_BTD + h_BTD, _ACT)
    x_BTD = x_BTD + MLP(c, name="mlp")(norm("post_attention_layernorm")(x_BTD))
    return nn.with_logical_constraint(x_BTD, _ACT), new_cache


def _training_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """Causal mask within each packed segment; segment 0 is padding."""
  T = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((T, T), bool))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_BTS & (segment_ids_BT[:, None, :] != 0)


def _cache_mask(cache: KVCache, segment_ids_BT: jax.Array):
  """Marks the new tokens' slots valid; each query sees valid slots up to its own."""
  T = segment_ids_BT.shape[1]
  valid_BS = jax.lax.dynamic_update_slice(
      cache.valid_BS, segment_ids_BT != 0, (0, cache.index))
  query_slot_T = cache.index + jnp.arange(T)
  key_slot_S = jnp.arange(cache.max_length)
  mask_BTS = (key_slot_S[None, None, :] <= query_slot_T[None, :, None]) & valid_BS[:, None, :]
  return mask_BTS, valid_BS


class Transformer(nn.Module):
  """Decoder-only language model."""

  config: ModelConfig

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache for this model (the sampler calls this on either model family)."""
    return init_cache(self.config, batch, max_length, dtype)

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               return_hidden: bool = False):
    """Args:
      tokens_BT: int token ids.
      positions_BT: rotary positions (default: consecutive from the cache index, or
        0..T-1); restart them per packed segment, and pass them for left-padded rows.
      segment_ids_BT: packed-document ids, 0 for padding (default: all 1).
      cache: a KVCache to extend (prefill/decode), or None for a training forward.
        With a cache every non-zero segment id counts as one document (no packing),
        and the caller keeps cache.index + T <= cache.max_length (writes past the
        end would be clamped by dynamic_update_slice; the sampler checks it).
      return_hidden: return the final normed hidden states [B, T, D] instead of logits.
    Returns:
      (logits_BTV float32 or hidden_BTD, the updated cache or None).
    """
    c = self.config
    B, T = tokens_BT.shape
    if positions_BT is None:  # contiguous from the cache's write slot (no left padding)
      start = 0 if cache is None else cache.index
      positions_BT = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if cache is None:
      mask_BTS, new_valid = _training_mask(segment_ids_BT), None
    else:
      mask_BTS, new_valid = _cache_mask(cache, segment_ids_BT)

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=param_init(c, "vocab", "embed"), name="embed_tokens")
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), _ACT)
    block_cls = nn.remat(Block) if c.remat else Block
    new_layers = []
    for i in range(c.num_hidden_layers):
      layer_cache = None if cache is None else cache.layers[i]
      index = None if cache is None else cache.index
      x_BTD, layer_cache = block_cls(c, name=f"layers_{i}")(
          x_BTD, positions_BT, mask_BTS, layer_cache, index, layer_prefix(cache, i))
      new_layers.append(layer_cache)
    x_BTD = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x_BTD)

    new_cache = None if cache is None else cache.replace(
        layers=tuple(new_layers), valid_BS=new_valid, index=cache.index + T)
    if return_hidden:
      return x_BTD, new_cache
    return output_logits(c, embed, x_BTD), new_cache


def layer_prefix(cache: Optional[KVCache], i: int):
  """Layer i's shared prefix and its valid slots, or None."""
  if cache is None or cache.prefix is None:
    return None
  return cache.prefix.layers[i], cache.prefix.valid_BS


def output_logits(c, embed: nn.Embed, x_BTD: jax.Array) -> jax.Array:
  """Float32 logits [B, T, V] of the final normed hidden states: the tied
  embedding or the `lm_head` (created in the calling module's compact scope)."""
  if c.tie_word_embeddings:
    logits_BTV = embed.attend(x_BTD)
  else:
    logits_BTV = Einsum("BTD,DV->BTV", (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                        c, name="lm_head")(x_BTD)
  return nn.with_logical_constraint(
      logits_BTV.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))


def output_weights_DV(config: ModelConfig, params) -> jax.Array:
  """The [D, V] matrix mapping final hidden states to logits (tied or untied)."""
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def count_params(params) -> int:
  """Number of scalars in a (possibly abstract) params pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))

"""DeepSeek-V3: MLA attention, DeepSeekMoE (first layers dense) and optional
multi-token prediction, as a Flax linen module with the dense Transformer's API.

`DeepseekV3.apply({"params": p, **model_state}, tokens_BT, positions_BT,
segment_ids_BT, cache, return_hidden=...)` returns `(logits_BTV or hidden_BTD,
new_cache)`, exactly like `r1jax.models.transformer.Transformer`, so the
sampler, the log-prob kernels (`output_weights_DV`) and the trainers take
either model. What differs:
  - `model_state` = {"moe_state": router biases}: not trained, moved by the
    trainers after each optimizer step (r1jax.models.moe.update_router_bias).
  - `mutable=["moe_stats"]` returns per-layer expert loads, drops and the
    balance loss; `mutable=["mtp"]` also runs the MTP modules and returns their
    normed hidden states (`mtp_loss`). Neither is computed otherwise.
  - the cache (`init_cache`) holds per layer the kv latent and the rope key
    (r1jax.models.mla.MLACache), not per-head keys and values.

Hugging Face conversion (`config_from_hf`, `params_from_hf`,
`model_state_from_hf`, `params_to_hf`) goes by key name; our param names follow
Hugging Face's (`q_a_proj`, `kv_b_proj`, `mlp.gate`, `shared_experts`, ...).

Where we follow DeepSeek's reference inference code (inference/model.py of
DeepSeek-V3) rather than transformers (5.x `modeling_deepseek_v3.py`):
  - YaRN (frequencies and the softmax mscale²) applies only when the context is
    extended (max_position_embeddings > original_max_position_embeddings);
    transformers applies it whenever rope_type is yarn.
  - with rope_scaling.mscale_all_dim unset, the softmax scale uses mscale² and
    cos/sin are not scaled (reference); transformers then scales cos/sin by
    mscale(factor) instead. With mscale_all_dim set (every DeepSeek config)
    both follow DeepSeek's own Hugging Face code and agree.
  - the top-k weights are renormalised without transformers' +1e-20.
  - masked groups get -inf before the top-k (reference and transformers 5.x;
    transformers 4.4x-4.5x used 0.0, which lets a masked group's expert win
    when biased scores are negative: tests/test_moe.py covers that case).
  - the MTP modules (layers num_hidden_layers.. in the checkpoint) are
    dropped by transformers; we load and train them (`mtp_0`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.models.layers import MLP, Einsum, RMSNorm, param_init
from r1jax.models.mla import MLA, MLACache
from r1jax.models.moe import BIAS, STATE, MoE
from r1jax.models.transformer import (KVCache, _cache_mask, _training_mask, layer_prefix,
                                     output_logits)

_ACT = ("activation_batch", "activation_length", "activation_embed")
DISPATCH = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
  """Shape and numerics of a DeepSeek-V3-style MoE decoder (Hugging Face field
  names; rope_scaling's yarn fields are flattened to rope_* so the config is
  hashable and round-trips through ml_collections)."""

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F of the first_k_dense_replace dense layers
  moe_intermediate_size: int  # F of each routed / shared expert
  num_hidden_layers: int
  num_attention_heads: int  # N
  q_lora_rank: Optional[int]  # Q; None = plain q_proj (DeepSeek-V2-Lite)
  kv_lora_rank: int  # R: the cached latent
  qk_nope_head_dim: int  # Hn
  qk_rope_head_dim: int  # Hr: the rotary part, one key shared by all heads
  v_head_dim: int  # Hv
  n_routed_experts: int  # E
  n_shared_experts: int
  num_experts_per_tok: int  # K
  n_group: int = 1  # expert groups for group-limited routing
  topk_group: int = 1  # groups a token may route to
  routed_scaling_factor: float = 1.0
  first_k_dense_replace: int = 0  # the first layers use a dense SwiGLU
  norm_topk_prob: bool = True
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rope_interleave: bool = True  # DeepSeek's rope dims are interleaved pairs
  rope_scaling_type: Optional[str] = None  # None or "yarn"
  rope_scaling_factor: float = 1.0
  rope_original_max_position_embeddings: int = 4096
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_mscale: float = 1.0
  rope_mscale_all_dim: float = 0.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  num_nextn_predict_layers: int = 0  # multi-token-prediction depth (0 = off)
  # r1jax-specific.
  model_type: str = "deepseek_v3"  # tells config dicts of the two model families apart
  dispatch: str = "dropless"  # dropless (sorted grouped matmul) | capacity (einsum, drops)
  grouped_matmul: str = "auto"  # dropless matmul: auto | ragged_dot | blocked (moe.py)
  capacity_factor: float = 1.25  # capacity dispatch: slots = cf * T * K / E per row
  bias_update_rate: float = 0.001  # gamma: router bias step per optimizer step
  aux_loss_weight: float = 0.0001  # alpha of the sequence-wise balance loss (0 = off)
  mtp_loss_weight: float = 0.3  # lambda of the MTP loss (with num_nextn_predict_layers)
  dtype: str = "float32"  # activation / matmul dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass

  def __post_init__(self):
    E, G = self.n_routed_experts, self.n_group
    problems = []
    if self.model_type != "deepseek_v3":
      problems.append(f"model_type={self.model_type!r} is not 'deepseek_v3'")
    if E % G:
      problems.append(f"n_routed_experts={E} is not a multiple of n_group={G}")
    elif G > 1 and E // G < 2:
      problems.append(f"groups of {E // G} expert: group scores need >= 2 per group")
    if not 1 <= self.topk_group <= G:
      problems.append(f"topk_group={self.topk_group} must be in [1, n_group={G}]")
    elif self.num_experts_per_tok > self.topk_group * (E // G):
      problems.append(f"num_experts_per_tok={self.num_experts_per_tok} > the "
                      f"{self.topk_group * (E // G)} experts of topk_group={self.topk_group} groups")
    if self.qk_rope_head_dim % 2:
      problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
    if self.dispatch not in DISPATCH:
      problems.append(f"dispatch={self.dispatch!r} must be one of {DISPATCH}")
    if self.rope_scaling_type not in (None, "yarn"):
      problems.append(f"rope_scaling_type={self.rope_scaling_type!r} must be None or 'yarn'")
    if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
      problems.append(f"first_k_dense_replace={self.first_k_dense_replace} outside "
                      f"[0, num_hidden_layers={self.num_hidden_layers}]")
    if problems:
      raise ValueError("DeepseekV3Config: " + "; ".join(problems))

  def replace(self, **kw) -> "DeepseekV3Config":
    return dataclasses.replace(self, **kw)

  def is_moe_layer(self, i: int) -> bool:
    return i >= self.first_k_dense_replace


# ---------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------

PRESETS: dict[str, DeepseekV3Config] = {
    # deepseek-ai/DeepSeek-V3 config.json: 671B total, 37B activated per token
    # (+ one MTP module, 14B with its copies of embedding and head).
    "deepseek-v3": DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
        max_position_embeddings=163840, rope_theta=10000.0, rope_scaling_type="yarn",
        rope_scaling_factor=40.0, rope_original_max_position_embeddings=4096,
        rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0, rope_mscale_all_dim=1.0,
        num_nextn_predict_layers=1, dtype="bfloat16", param_dtype="bfloat16"),
    # One accelerator: DeepSeek-V2-Lite's shapes (15.7B total, 2.4B active; no
    # q latent) with V3's router (sigmoid + selection bias, 8 groups of 8).
    # bf16 params take 31 GB; training it needs the optimizer state sharded.
    "deepseek-v3-lite-16b": DeepseekV3Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=8, topk_group=4, routed_scaling_factor=1.0, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_scaling_type="yarn", rope_scaling_factor=40.0,
        rope_original_max_position_embeddings=4096, rope_mscale=0.707,
        rope_mscale_all_dim=0.707, dtype="bfloat16", param_dtype="bfloat16"),
    # The tiny world's MoE base (CPU): V3's structure at D=128 — 2 dense + 2 MoE
    # layers, 8 routed experts in 4 groups (2 groups, top-2), 1 shared expert.
    # gamma 0.01, not V3's 0.001: V3 had ~10^5 steps to balance, this has 600
    # (100 pretraining steps: max/mean load 1.14 vs 1.91, same loss).
    # kv_lora_rank 64 and qk_rope_head_dim 32, not 32 and 16: with the narrower
    # latent and rope key the base never learns to copy an operand out of the
    # question (23% right teacher-forced; 98% with these; experiments/README.md).
    "deepseek-v3-tiny": DeepseekV3Config(
        vocab_size=640, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=1.0, first_k_dense_replace=2, max_position_embeddings=512,
        tie_word_embeddings=True, bias_update_rate=0.01),
}


def get_preset(name: str, **overrides) -> DeepseekV3Config:
  """Returns the named DeepSeek-V3 preset with `overrides` applied."""
  if name not in PRESETS:
    raise KeyError(f"unknown DeepSeek-V3 preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------

def init_cache(config: DeepseekV3Config, batch: int, max_length: int, dtype=None) -> KVCache:
  """An empty MLA cache: per layer the kv latent [B, S, R] and rope key [B, S, Hr]."""
  dtype = dtype or config.dtype
  layer = lambda: MLACache(
      kv_latent=jnp.zeros((batch, max_length, config.kv_lora_rank), dtype),
      k_rope=jnp.zeros((batch, max_length, config.qk_rope_head_dim), dtype))
  return KVCache(layers=tuple(layer() for _ in range(config.num_hidden_layers)),
                 valid_BS=jnp.zeros((batch, max_length), bool),
                 index=jnp.zeros((), jnp.int32))


class DecoderLayer(nn.Module):
  """Pre-norm block: x + MLA(norm(x)); x + (MoE or dense SwiGLU)(norm(x))."""

  config: DeepseekV3Config
  moe: bool

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, cache_index, valid_BT, prefix=None):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    h_BTD, new_cache = MLA(c, name="self_attn")(
        norm("input_layernorm")(x_BTD), positions_BT, mask_BTS, cache, cache_index, prefix)
    x_BTD = nn.with_logical_constraint(x_BTD + h_BTD, _ACT)
    h_BTD = norm("post_attention_layernorm")(x_BTD)
    if self.moe:
      h_BTD = MoE(c, name="mlp")(h_BTD, valid_BT)
    else:
      h_BTD = MLP(c, name="mlp")(h_BTD)
    return nn.with_logical_constraint(x_BTD + h_BTD, _ACT), new_cache


class MTPLayer(nn.Module):
  """Multi-token prediction module k (V3 §2.2): combines the previous depth's
  hidden state at position i with the embedding of token i+k, runs one block,
  and norms for the shared output head."""

  config: DeepseekV3Config
  layer_index: int  # its index in the checkpoint (num_hidden_layers + k - 1)

  @nn.compact
  def __call__(self, h_BTD, emb_BTD, positions_BT, mask_BTS, valid_BT):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    D = c.hidden_size
    # Order [embedding; hidden] as in DeepSeek's checkpoint (eh_proj's input
    # halves); I = 2D.
    cat_BTI = jnp.concatenate([norm("enorm")(emb_BTD), norm("hnorm")(h_BTD)], axis=-1)
    h_BTD = Einsum("BTI,ID->BTD", (2 * D, D), (None, "embed"), c, name="eh_proj")(cat_BTI)
    h_BTD, _ = DecoderLayer(c, moe=c.is_moe_layer(self.layer_index), name="block")(
        h_BTD, positions_BT, mask_BTS, None, None, valid_BT)
    return h_BTD, norm("shared_head_norm")(h_BTD)


class DeepseekV3(nn.Module):
  """Decoder-only MoE language model (same call as Transformer)."""

  config: DeepseekV3Config
  # Non-param collections a train state keeps (and checkpoints) with the params.
  STATE_COLLECTIONS = (STATE,)

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    return init_cache(self.config, batch, max_length, dtype)

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               return_hidden: bool = False):
    """As `Transformer.__call__`: (logits_BTV float32 or final normed hidden_BTD, cache)."""
    c = self.config
    B, T = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache.index
      positions_BT = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if cache is None:
      mask_BTS, new_valid = _training_mask(segment_ids_BT), None
    else:
      mask_BTS, new_valid = _cache_mask(cache, segment_ids_BT)
    valid_BT = segment_ids_BT != 0

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=param_init(c, "vocab", "embed"), name="embed_tokens")
    x_BTD = nn.with_logical_constraint(embed(tokens_BT), _ACT)
    layer_cls = nn.remat(DecoderLayer) if c.remat else DecoderLayer
    new_layers = []
    for i in range(c.num_hidden_layers):
      layer_cache = None if cache is None else cache.layers[i]
      index = None if cache is None else cache.index
      x_BTD, layer_cache = layer_cls(c, moe=c.is_moe_layer(i), name=f"layers_{i}")(
          x_BTD, positions_BT, mask_BTS, layer_cache, index, valid_BT, layer_prefix(cache, i))
      new_layers.append(layer_cache)

    if c.num_nextn_predict_layers and cache is None and self.is_mutable_collection("mtp"):
      h_BTD = x_BTD  # the main model's last hidden state, before its final norm
      for k in range(1, c.num_nextn_predict_layers + 1):
        ahead_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k)))  # token i+k at position i
        h_BTD, normed_BTD = MTPLayer(c, c.num_hidden_layers + k - 1, name=f"mtp_{k - 1}")(
            h_BTD, embed(ahead_BT), positions_BT, mask_BTS, valid_BT)
        self.sow("mtp", f"hidden_{k}", normed_BTD)

    x_BTD = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x_BTD)
    new_cache = None if cache is None else cache.replace(
        layers=tuple(new_layers), valid_BS=new_valid, index=cache.index + T)
    if return_hidden:
      return x_BTD, new_cache
    return output_logits(c, embed, x_BTD), new_cache


# ---------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------

def _leaves(tree, keep: Callable[[tuple[str, ...]], bool]) -> int:
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    if keep(keys):
      total += int(np.prod(x.shape))
  return total


def count_main_params(params) -> int:
  """Parameters of the main model (MTP modules excluded), e.g. 671B for V3."""
  return _leaves(params, lambda keys: not keys[0].startswith("mtp_"))


def count_active_params(params, config: DeepseekV3Config) -> int:
  """Main-model parameters that multiply each token: all but the (E - K) routed
  experts an MoE layer does not pick, and but the input embedding table (a
  lookup; it counts when tied, as the output head). DeepSeek's convention:
  36.6B ("37B") of V3's 671B, 2.45B ("2.4B") of V2-Lite's 15.7B."""
  c = config
  routed = _leaves(params, lambda keys: not keys[0].startswith("mtp_") and "experts" in keys)
  unused = routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
  lookup = 0 if c.tie_word_embeddings else _leaves(params, lambda keys: keys[0] == "embed_tokens")
  return count_main_params(params) - unused - lookup


# ---------------------------------------------------------------------------
# Hugging Face conversion.
# ---------------------------------------------------------------------------

_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "first_k_dense_replace", "norm_topk_prob",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
    "num_nextn_predict_layers", "rope_interleave")


def config_from_hf(hf_config: dict, **overrides) -> DeepseekV3Config:
  """A Hugging Face DeepSeek-V3 `config.json` (as a dict) -> DeepseekV3Config.

  Reads both the 4.x layout (rope_theta + rope_scaling) and the 5.x one
  (rope_parameters). `overrides` set r1jax fields (dtype, dispatch, ...).
  Raises ValueError for what r1jax does not implement.
  """
  hf = dict(hf_config)
  if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
    raise ValueError(f"config model_type={hf.get('model_type')!r} is not deepseek_v3")
  unsupported = {
      "hidden_act": ("silu", hf.get("hidden_act", "silu")),
      "scoring_func": ("sigmoid", hf.get("scoring_func", "sigmoid")),
      "topk_method": ("noaux_tc", hf.get("topk_method", "noaux_tc")),
      "attention_bias": (False, bool(hf.get("attention_bias", False))),
  }
  for name, (want, got) in unsupported.items():
    if got != want:
      raise ValueError(f"config {name}={got!r}: r1jax supports only {want!r}")
  if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
    hf["num_nextn_predict_layers"] = hf["num_mtp_layers"]
  kw = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kw["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "yarn":
    kw.update(
        rope_scaling_type="yarn", rope_scaling_factor=float(rope["factor"]),
        rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        rope_beta_fast=float(rope.get("beta_fast") or 32.0),
        rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        rope_mscale=float(rope.get("mscale") or 1.0),
        rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
  elif rope_type != "default":
    raise ValueError(f"config rope type {rope_type!r}: r1jax supports default and yarn")
  kw.update(overrides)
  return DeepseekV3Config(**kw)


def _hf_layer_map(config: DeepseekV3Config, i: int, moe: bool) -> dict[str, tuple]:
  """{Hugging Face key suffix: (our path, to_ours, from_ours)} of one decoder block."""
  c = config
  N, Hn, Hr, Hv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
  D = c.hidden_size
  T = lambda w: w.T
  heads_out = lambda H: (lambda w: w.reshape(N, H, -1).transpose(2, 0, 1),  # [N*H, in] -> [in, N, H]
                         lambda w: w.transpose(1, 2, 0).reshape(N * H, -1))
  m = {
      "input_layernorm.weight": (("input_layernorm", "scale"), None, None),
      "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), None, None),
      "self_attn.kv_a_proj_with_mqa.weight": (("self_attn", "kv_a_proj_with_mqa", "kernel"), T, T),
      "self_attn.kv_a_layernorm.weight": (("self_attn", "kv_a_layernorm", "scale"), None, None),
      "self_attn.kv_b_proj.weight": (("self_attn", "kv_b_proj", "kernel"), *heads_out(Hn + Hv)),
      "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"),
                                  lambda w: w.reshape(D, N, Hv).transpose(1, 2, 0),
                                  lambda w: w.transpose(2, 0, 1).reshape(D, N * Hv)),
  }
  if c.q_lora_rank:
    m["self_attn.q_a_proj.weight"] = (("self_attn", "q_a_proj", "kernel"), T, T)
    m["self_attn.q_a_layernorm.weight"] = (("self_attn", "q_a_layernorm", "scale"), None, None)
    m["self_attn.q_b_proj.weight"] = (("self_attn", "q_b_proj", "kernel"), *heads_out(Hn + Hr))
  else:
    m["self_attn.q_proj.weight"] = (("self_attn", "q_proj", "kernel"), *heads_out(Hn + Hr))
  mlps = ["mlp"] if not moe else (["mlp.shared_experts"] if c.n_shared_experts else [])
  for prefix in mlps:
    ours = tuple(prefix.split("."))
    for proj in ("gate_proj", "up_proj", "down_proj"):
      m[f"{prefix}.{proj}.weight"] = (ours + (proj, "kernel"), T, T)
  if moe:
    m["mlp.gate.weight"] = (("mlp", "gate", "kernel"), T, T)
  return m


def _blocks(config: DeepseekV3Config):
  """(Hugging Face layer index, our path prefix, is MoE) of every block, MTP included."""
  for i in range(config.num_hidden_layers):
    yield i, (f"layers_{i}",), config.is_moe_layer(i)
  for k in range(config.num_nextn_predict_layers):
    i = config.num_hidden_layers + k
    yield i, (f"mtp_{k}", "block"), config.is_moe_layer(i)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def params_from_hf(get_tensor: Callable[[str], np.ndarray], config: DeepseekV3Config) -> dict:
  """Our params pytree (numpy, param_dtype) from Hugging Face tensors by key.

  `get_tensor(key)` returns the tensor stored under `key` in the safetensors
  shards (e.g. 'model.layers.3.mlp.experts.5.gate_proj.weight'). The MTP
  modules are read from 'model.layers.{num_hidden_layers + k}.*' (DeepSeek's
  checkpoint layout) when num_nextn_predict_layers > 0. Router biases are
  state, not params: see `model_state_from_hf`.
  """
  c = config
  dtype = np.dtype(jnp.dtype(c.param_dtype))
  get = lambda key: np.asarray(get_tensor(key)).astype(dtype)
  params: dict = {}
  _set(params, ("embed_tokens", "embedding"), get("model.embed_tokens.weight"))
  _set(params, ("norm", "scale"), get("model.norm.weight"))
  if not c.tie_word_embeddings:
    _set(params, ("lm_head", "kernel"), get("lm_head.weight").T)
  for i, prefix, moe in _blocks(c):
    for suffix, (path, to_ours, _) in _hf_layer_map(c, i, moe).items():
      w = get(f"model.layers.{i}.{suffix}")
      _set(params, prefix + path, to_ours(w) if to_ours else w)
    if moe:
      for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = np.stack([get(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight").T
                            for e in range(c.n_routed_experts)])
        _set(params, prefix + ("mlp", "experts", proj), stacked)
  for k in range(c.num_nextn_predict_layers):
    i = c.num_hidden_layers + k
    for name in ("enorm", "hnorm"):
      _set(params, (f"mtp_{k}", name, "scale"), get(f"model.layers.{i}.{name}.weight"))
    _set(params, (f"mtp_{k}", "eh_proj", "kernel"), get(f"model.layers.{i}.eh_proj.weight").T)
    _set(params, (f"mtp_{k}", "shared_head_norm", "scale"),
         get(f"model.layers.{i}.shared_head.norm.weight"))
  return params


def model_state_from_hf(get_tensor: Callable[[str], np.ndarray],
                        config: DeepseekV3Config) -> dict:
  """{"moe_state": router biases} from 'model.layers.L.mlp.gate.e_score_correction_bias'."""
  state: dict = {}
  for i, prefix, moe in _blocks(config):
    if moe:
      bias = np.asarray(get_tensor(f"model.layers.{i}.mlp.gate.{BIAS}"), np.float32)
      _set(state, prefix + ("mlp", "gate", BIAS), bias)
  return {STATE: state} if state else {}


def params_to_hf(params, config: DeepseekV3Config, model_state: Optional[dict] = None
                 ) -> dict[str, np.ndarray]:
  """Hugging Face tensors by key (the inverse of params_from_hf / model_state_from_hf).

  `params` may also be the variables {"params": ..., "moe_state": ...}. The
  router biases are part of the model: without them (model_state or the
  variables' "moe_state") this raises rather than write zeros. MTP modules are
  written as 'model.layers.{num_hidden_layers + k}.*' with copies of the
  embedding and head (DeepSeek's layout; transformers ignores them).
  """
  c = config
  if "params" in params:
    model_state = {k: v for k, v in params.items() if k != "params"} or model_state
    params = params["params"]
  if STATE not in (model_state or {}) and any(c.is_moe_layer(i) for i, _, _ in _blocks(c)):
    raise ValueError("params_to_hf needs the router biases: pass model_state "
                     "(TrainState.model_state) or the variables {'params', 'moe_state'}")
  p = jax.tree.map(np.asarray, params)
  out = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"],
         "model.norm.weight": p["norm"]["scale"]}
  head = p["embed_tokens"]["embedding"] if c.tie_word_embeddings else p["lm_head"]["kernel"].T
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = head
  state = (model_state or {}).get(STATE, {})
  for i, prefix, moe in _blocks(c):
    for suffix, (path, _, from_ours) in _hf_layer_map(c, i, moe).items():
      w = _get(p, prefix + path)
      out[f"model.layers.{i}.{suffix}"] = from_ours(w) if from_ours else w
    if moe:
      for proj in ("gate_proj", "up_proj", "down_proj"):
        stacked = _get(p, prefix + ("mlp", "experts", proj))
        for e in range(c.n_routed_experts):
          out[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = stacked[e].T
      out[f"model.layers.{i}.mlp.gate.{BIAS}"] = np.asarray(
          _get(state, prefix + ("mlp", "gate", BIAS)), np.float32)
  for k in range(c.num_nextn_predict_layers):
    i, mtp = c.num_hidden_layers + k, p[f"mtp_{k}"]
    out.update({
        f"model.layers.{i}.enorm.weight": mtp["enorm"]["scale"],
        f"model.layers.{i}.hnorm.weight": mtp["hnorm"]["scale"],
        f"model.layers.{i}.eh_proj.weight": mtp["eh_proj"]["kernel"].T,
        f"model.layers.{i}.shared_head.norm.weight": mtp["shared_head_norm"]["scale"],
        f"model.layers.{i}.shared_head.head.weight": head,
        f"model.layers.{i}.embed_tokens.weight": p["embed_tokens"]["embedding"],
    })
  return out


def config_to_hf(config: DeepseekV3Config) -> dict:
  """The Hugging Face config.json of `config` (DeepSeek's own 4.x layout:
  rope_theta + rope_scaling; transformers 5 reads it too)."""
  c = config
  out = {k: getattr(c, k) for k in _HF_FIELDS}
  out.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
             hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc",
             attention_bias=False, num_key_value_heads=c.num_attention_heads,
             rope_theta=c.rope_theta, rope_scaling=None)
  if c.rope_scaling_type == "yarn":
    out["rope_scaling"] = dict(
        type="yarn", rope_type="yarn", factor=c.rope_scaling_factor,
        original_max_position_embeddings=c.rope_original_max_position_embeddings,
        beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, mscale=c.rope_mscale,
        mscale_all_dim=c.rope_mscale_all_dim)
  return out


def make_model(config: DeepseekV3Config) -> DeepseekV3:
  return DeepseekV3(config)

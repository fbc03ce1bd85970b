"""DeepSeekMoE: shared experts + routed experts behind a sigmoid router with
group-limited top-k and aux-loss-free load balancing.

Router (DeepSeek-V3 reference inference code, `Gate.forward`):

    s      = sigmoid(x · W)                 # affinities, float32
    b_s    = s + bias                       # the bias only steers *selection*
    group  = sum of the top-2 of b_s in each of n_group groups
    b_s    = -inf outside the topk_group best groups
    idx    = top-k(b_s)
    weight = s[idx] / sum(s[idx]) * routed_scaling_factor   # un-biased, renormalised

Aux-loss-free balancing: the bias is not a parameter. It lives in the
`moe_state` collection and, after every optimizer step, moves by
±bias_update_rate towards balance: bias += γ · sign(mean_load - load)
(`update_router_bias`, called by the trainers). The per-layer load counts come
out of the forward through the `moe_stats` collection (only when the caller
makes it mutable), with the dropped-token count and the sequence-wise balance
loss (V3 eq. 17-20, weighted by aux_loss_weight in the trainers).

Expert dispatch (`dispatch` in the config):
  dropless  sort the (token, k) assignments by expert, one grouped matmul per
            projection (`grouped_matmul`: jax.lax.ragged_dot, or a blocked
            gather-matmul twin that is much faster on CPU), unsort.
  capacity  GShard-style one-hot einsum dispatch into [E, C] slots per batch row,
            C = ceil(capacity_factor · T · K / E); assignments past an expert's C
            are dropped (first choices of every token before second choices).
Both agree at real tokens when nothing is dropped (tests/test_moe.py); at padding
positions (segment id 0) capacity dispatch routes nothing and dropless routes as usual.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.models.layers import MLP, param_init

STATE = "moe_state"  # persistent, non-trained: the router biases (checkpointed)
STATS = "moe_stats"  # per-forward statistics; only computed when mutable
BIAS = "e_score_correction_bias"  # Hugging Face's name for the router bias
ROUTER = "gate"  # the router's module name (Hugging Face's), under each MoE layer's "mlp"
GROUPED_MATMUL_IMPLS = ("auto", "ragged_dot", "blocked")


# ---------------------------------------------------------------------------
# Router.
# ---------------------------------------------------------------------------

def route(logits_TE: jax.Array, bias_E: jax.Array, *, top_k: int, n_group: int,
          topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True):
  """Expert choice from router logits (float32). Returns (weights_TK, experts_TK, scores_TE).

  Selection uses the biased scores, the weights the un-biased ones; experts in
  groups outside the top `topk_group` are masked with -inf (never chosen).
  """
  scores_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
  choice_TE = scores_TE + bias_E.astype(jnp.float32)
  T, E = choice_TE.shape
  if n_group > 1:
    choice_TGe = choice_TE.reshape(T, n_group, E // n_group)
    group_TG = jax.lax.top_k(choice_TGe, 2)[0].sum(-1)
    _, groups_Tg = jax.lax.top_k(group_TG, topk_group)
    keep_TG = jnp.any(jax.nn.one_hot(groups_Tg, n_group, dtype=bool), axis=1)
    choice_TE = jnp.where(keep_TG[..., None], choice_TGe, -jnp.inf).reshape(T, E)
  _, experts_TK = jax.lax.top_k(choice_TE, top_k)
  weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if norm_topk_prob:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return weights_TK * routed_scaling_factor, experts_TK, scores_TE


def sequence_balance_loss(scores_BTE: jax.Array, experts_BTK: jax.Array,
                          valid_BT: jax.Array) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss Σ_e f_e P_e, averaged over rows
  (unweighted; the trainers multiply by aux_loss_weight).

  f_e = E / (K T) · #{t : e in top-k(t)},  P_e = mean_t s_te / Σ_e' s_te'.
  """
  B, T, E = scores_BTE.shape
  K = experts_BTK.shape[-1]
  w_BT = valid_BT.astype(jnp.float32)
  n_B = jnp.sum(w_BT, axis=1)
  chosen_BE = jnp.einsum("BTKE,BT->BE", jax.nn.one_hot(experts_BTK, E), w_BT)
  f_BE = jax.lax.stop_gradient(chosen_BE * E / (K * jnp.maximum(n_B, 1.0))[:, None])
  p_BTE = scores_BTE / jnp.sum(scores_BTE, axis=-1, keepdims=True)
  P_BE = jnp.einsum("BTE,BT->BE", p_BTE, w_BT) / jnp.maximum(n_B, 1.0)[:, None]
  loss_B = jnp.sum(f_BE * P_BE, axis=-1)
  rows = n_B > 0
  return jnp.sum(jnp.where(rows, loss_B, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


class Router(nn.Module):
  """The gate: float32 logits x·W, and the selection bias as non-trained state."""

  config: Any

  @nn.compact
  def __call__(self, x_BTD: jax.Array):
    c = self.config
    E = c.n_routed_experts
    kernel_DE = self.param("kernel", param_init(c, "embed", None), (c.hidden_size, E),
                           c.param_dtype)
    if not self.is_initializing() and not self.has_variable(STATE, BIAS):
      raise ValueError(f"{self.path}: the '{STATE}' collection (router biases) is missing: "
                       f"apply with {{'params': ..., **model_state}} (TrainState.model_state)")
    bias_E = self.variable(STATE, BIAS, lambda: jnp.zeros((E,), jnp.float32)).value
    logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(jnp.float32),
                            kernel_DE.astype(jnp.float32))
    B, T, _ = logits_BTE.shape
    weights_TK, experts_TK, scores_TE = route(
        logits_BTE.reshape(B * T, E), bias_E, top_k=c.num_experts_per_tok, n_group=c.n_group,
        topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
        norm_topk_prob=c.norm_topk_prob)
    K = c.num_experts_per_tok
    return (weights_TK.reshape(B, T, K), experts_TK.reshape(B, T, K),
            scores_TE.reshape(B, T, E))


# ---------------------------------------------------------------------------
# Grouped matmul (dropless dispatch).
# ---------------------------------------------------------------------------

def resolve_grouped_matmul(impl: str) -> str:
  """`auto` -> ragged_dot on accelerators, blocked on CPU (where XLA lowers
  ragged_dot to a dense masked matmul over every group: E times the work)."""
  if impl not in GROUPED_MATMUL_IMPLS:
    raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMUL_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
  return impl


def _block_rows(M: int, E: int) -> int:
  """Rows per block: about the mean group size, a power of two in [8, 128]."""
  mean = max(1, -(-M // E))
  return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
  """y[m] = x[m] @ w[group(m)] for rows sorted by group (jax.lax.ragged_dot semantics).

  `blocked`: rows are scattered into blocks of one group each (every group
  padded to a whole number of blocks, at most M/bs + E blocks), each block is
  multiplied by its group's weight, and rows are gathered back. Exact like
  ragged_dot; work ~ M·D·F plus padding. Groups that got no rows touch no
  block, so their weight gradient is exactly zero.
  """
  impl = resolve_grouped_matmul(impl)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x_MD, w_EDF, group_sizes_E.astype(jnp.int32))
  M, D = x_MD.shape
  E, _, F = w_EDF.shape
  bs = _block_rows(M, E)
  num_blocks = -(-M // bs) + E
  sizes_E = group_sizes_E.astype(jnp.int32)
  blocks_E = -(-sizes_E // bs)
  ends_E = jnp.cumsum(sizes_E)
  block_ends_E = jnp.cumsum(blocks_E)
  # Group of each row / block: how many group ends lie at or before it
  # (compare_all: E is small, and it compiles much faster than a scan).
  find = lambda ends, n: jnp.minimum(
      jnp.searchsorted(ends, jnp.arange(n), side="right", method="compare_all"), E - 1)
  group_M = find(ends_E, M)
  rank_M = jnp.arange(M) - (ends_E - sizes_E)[group_M]
  dest_M = (block_ends_E - blocks_E)[group_M] * bs + rank_M
  x_PD = jnp.zeros((num_blocks * bs, D), x_MD.dtype).at[dest_M].set(x_MD, mode="drop")
  block_group_N = find(block_ends_E, num_blocks)
  y_NbF = jnp.einsum("NbD,NDF->NbF", x_PD.reshape(num_blocks, bs, D), w_EDF[block_group_N])
  return y_NbF.reshape(num_blocks * bs, F)[dest_M]


# ---------------------------------------------------------------------------
# Experts and dispatch.
# ---------------------------------------------------------------------------

def _swiglu(gate, up):
  return nn.silu(gate) * up


def dropless_experts(x_BTD, experts_BTK, weights_BTK, w_gate_EDF, w_up_EDF, w_down_EFD, *,
                     impl: str = "auto") -> jax.Array:
  """Σ_k weight_k · expert_k(x) with every assignment computed (no capacity)."""
  B, T, D = x_BTD.shape
  K = experts_BTK.shape[-1]
  E = w_gate_EDF.shape[0]
  x_MD = jnp.asarray(x_BTD).reshape(B * T, D)
  expert_A = experts_BTK.reshape(-1)  # A = B*T*K assignments, token-major
  order_A = jnp.argsort(expert_A, stable=True)
  x_AD = x_MD[order_A // K]
  sizes_E = jnp.bincount(expert_A, length=E)
  gm = lambda x, w: grouped_matmul(x, w, sizes_E, impl=impl)
  h_AF = _swiglu(gm(x_AD, w_gate_EDF), gm(x_AD, w_up_EDF))
  y_AD = gm(h_AF, w_down_EFD)
  y_BTKD = y_AD[jnp.argsort(order_A)].reshape(B, T, K, D)
  return jnp.einsum("BTKD,BTK->BTD", y_BTKD, weights_BTK.astype(y_BTKD.dtype))


def capacity(T: int, K: int, E: int, capacity_factor: float) -> int:
  """Slots per expert and batch row: ceil(cf · T · K / E), at most T."""
  return max(1, min(T, math.ceil(capacity_factor * T * K / E)))


def capacity_experts(x_BTD, experts_BTK, weights_BTK, valid_BT, w_gate_EDF, w_up_EDF,
                     w_down_EFD, *, capacity_factor: float):
  """One-hot einsum dispatch into C slots per expert and row. Returns (out_BTD, dropped).

  `dropped` counts the valid (token, k) assignments that found their expert full.
  """
  B, T, D = x_BTD.shape
  K = experts_BTK.shape[-1]
  E = w_gate_EDF.shape[0]
  C = capacity(T, K, E, capacity_factor)
  onehot_BTKE = jax.nn.one_hot(experts_BTK, E, dtype=jnp.int32) * valid_BT[..., None, None]
  # Slot = rank in the expert's queue; the queue holds every token's first
  # choice, then every second choice, ... (k-major), in token order.
  queue_BAE = jnp.swapaxes(onehot_BTKE, 1, 2).reshape(B, K * T, E)
  rank_BTKE = jnp.swapaxes((jnp.cumsum(queue_BAE, axis=1) - 1).reshape(B, K, T, E), 1, 2)
  rank_BTK = jnp.sum(rank_BTKE * onehot_BTKE, axis=-1)
  keep_BTK = (rank_BTK < C) & (jnp.sum(onehot_BTKE, axis=-1) > 0)
  dtype = x_BTD.dtype
  slot_BTKC = jax.nn.one_hot(jnp.where(keep_BTK, rank_BTK, C), C, dtype=dtype)
  onehot_BTKE = onehot_BTKE.astype(dtype)
  dispatch_BTEC = jnp.einsum("BTKE,BTKC->BTEC", onehot_BTKE, slot_BTKC)
  combine_BTEC = jnp.einsum("BTKE,BTKC,BTK->BTEC", onehot_BTKE, slot_BTKC,
                            weights_BTK.astype(dtype))
  act = ("activation_batch", "expert", None, "activation_embed")
  x_BECD = nn.with_logical_constraint(jnp.einsum("BTEC,BTD->BECD", dispatch_BTEC, x_BTD), act)
  h_BECF = _swiglu(jnp.einsum("BECD,EDF->BECF", x_BECD, w_gate_EDF),
                   jnp.einsum("BECD,EDF->BECF", x_BECD, w_up_EDF))
  y_BECD = nn.with_logical_constraint(jnp.einsum("BECF,EFD->BECD", h_BECF, w_down_EFD), act)
  out_BTD = jnp.einsum("BECD,BTEC->BTD", y_BECD, combine_BTEC)
  dropped = jnp.sum(onehot_BTKE) - jnp.sum(keep_BTK)
  return out_BTD, dropped.astype(jnp.float32)


class ExpertWeights(nn.Module):
  """The routed experts' SwiGLU kernels, stacked on a leading expert axis
  (Hugging Face keeps one module per expert: mlp.experts.e.{gate,up,down}_proj)."""

  config: Any

  @nn.compact
  def __call__(self):
    c = self.config
    E, D, F = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
    w = lambda name, shape, axes: self.param(
        name, param_init(c, *axes), shape, c.param_dtype).astype(c.dtype)
    return (w("gate_proj", (E, D, F), ("expert", "embed", "mlp")),
            w("up_proj", (E, D, F), ("expert", "embed", "mlp")),
            w("down_proj", (E, F, D), ("expert", "mlp", "embed")))


class MoE(nn.Module):
  """Shared experts + routed experts (SwiGLU each); `config` is a DeepseekV3Config."""

  config: Any

  @nn.compact
  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array) -> jax.Array:
    c = self.config
    E, F, K = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    weights_BTK, experts_BTK, scores_BTE = Router(c, name=ROUTER)(x_BTD)
    w_gate_EDF, w_up_EDF, w_down_EFD = ExpertWeights(c, name="experts")()
    x_BTD = jnp.asarray(x_BTD, c.dtype)
    if c.dispatch == "dropless":
      routed_BTD = dropless_experts(x_BTD, experts_BTK, weights_BTK, w_gate_EDF, w_up_EDF,
                                    w_down_EFD, impl=c.grouped_matmul)
      dropped = jnp.zeros((), jnp.float32)
    else:
      routed_BTD, dropped = capacity_experts(
          x_BTD, experts_BTK, weights_BTK, valid_BT, w_gate_EDF, w_up_EDF, w_down_EFD,
          capacity_factor=c.capacity_factor)
    if self.is_mutable_collection(STATS):
      v_BT = valid_BT.astype(jnp.float32)
      load_E = jnp.einsum("BTKE,BT->E", jax.nn.one_hot(experts_BTK, E), v_BT)
      stats = dict(load=load_E, dropped=dropped, assignments=jnp.sum(v_BT) * K,
                   balance_loss=sequence_balance_loss(scores_BTE, experts_BTK, valid_BT))
      for name, value in stats.items():  # summed over calls (e.g. mini-batches of one apply)
        var = self.variable(STATS, name, lambda v=value: jnp.zeros_like(v))
        var.value = var.value + value
    if c.n_shared_experts:
      shared_c = c.replace(intermediate_size=F * c.n_shared_experts)
      routed_BTD = routed_BTD + MLP(shared_c, name="shared_experts")(x_BTD)
    return routed_BTD


# ---------------------------------------------------------------------------
# Between steps: bias update and metrics (pure functions on the collections).
# ---------------------------------------------------------------------------

def _router_paths(tree: Any, leaf: str) -> dict[tuple[str, ...], Any]:
  """{path of the MoE module: value} for every `leaf` in a nested dict."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    if keys[-1] == leaf:
      out[keys[:-2] if leaf == BIAS else keys[:-1]] = value
  return out


def _set_path(tree: dict, path: tuple[str, ...], value) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _set_path(tree[path[0]], path[1:], value)}


def update_router_bias(moe_state: Any, moe_stats: Any, rate: float) -> Any:
  """bias += rate · sign(mean_load - load) for every router that ran (MTP
  routers do not in GRPO steps); the aux-loss-free balancing step, applied
  after the optimizer step. Empty trees pass through."""
  if not moe_state:
    return moe_state
  loads = _router_paths(moe_stats, "load")
  new = moe_state
  for path, bias_E in _router_paths(moe_state, BIAS).items():
    if path not in loads:
      continue
    load_E = loads[path]
    step_E = rate * jnp.sign(jnp.mean(load_E) - load_E)
    new = _set_path(new, path + (ROUTER, BIAS), bias_E + step_E.astype(bias_E.dtype))
  return new


def balance_loss(moe_stats: Any) -> jax.Array:
  """Sum over MoE layers of the sequence-wise balance loss (0.0 without MoE)."""
  losses = _router_paths(moe_stats, "balance_loss")
  return sum(losses.values(), jnp.zeros((), jnp.float32))


def moe_metrics(moe_state: Any, moe_stats: Any) -> dict[str, jax.Array]:
  """Per MoE layer: load max/mean, dropped fraction, bias norm; and their summary."""
  if not moe_stats:
    return {}
  loads = _router_paths(moe_stats, "load")
  dropped = _router_paths(moe_stats, "dropped")
  assignments = _router_paths(moe_stats, "assignments")
  biases = _router_paths(moe_state, BIAS)
  out, imbalance = {}, []
  for path in sorted(loads):
    name = "/".join(p for p in path if p != "mlp")
    load_E = loads[path]
    ratio = jnp.max(load_E) / jnp.maximum(jnp.mean(load_E), 1e-9)
    imbalance.append(ratio)
    out[f"moe/{name}/load_max_over_mean"] = ratio
    out[f"moe/{name}/dropped_frac"] = dropped[path] / jnp.maximum(assignments[path], 1.0)
    if path in biases:
      out[f"moe/{name}/bias_norm"] = jnp.linalg.norm(biases[path])
  out["moe/load_max_over_mean"] = jnp.mean(jnp.stack(imbalance))
  out["moe/dropped_frac"] = (sum(dropped.values()) /
                             jnp.maximum(sum(assignments.values()), 1.0))
  out["moe/balance_loss"] = balance_loss(moe_stats)
  return out

"""What a train step needs from the model besides its hidden states: MoE router
statistics, the auxiliary losses (sequence-wise balance, multi-token
prediction), the router-bias update and their metrics.

Shared by the SFT and GRPO steps. For the dense Transformer every extra is
empty: `forward` is the plain call, `auxiliary_loss` returns None, and
`update_model_state` returns the (empty) state unchanged, so the dense step is
the same program as before.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from r1jax.losses.sft import hidden_cross_entropy
from r1jax.models import moe
from r1jax.models.transformer import output_weights_DV
from r1jax.trainers.state import state_collections

MTP = "mtp"


def _mtp_depth(model) -> int:
  c = model.config
  return getattr(c, "num_nextn_predict_layers", 0) if getattr(c, "mtp_loss_weight", 0) else 0


def forward(model, params, model_state, batch: dict[str, jax.Array], *, mtp: bool = False
            ) -> tuple[jax.Array, dict]:
  """Final normed hidden states [B, T, D] and the extras the model reports:
  {"moe_stats": per-layer loads/drops/balance loss, "mtp": MTP hidden states}.

  `mtp` asks for the MTP modules' outputs (when the model has them and their
  loss weight is non-zero); the GRPO step does not.
  """
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  if not state_collections(model):
    hidden_BTD, _ = model.apply({"params": params}, *args, return_hidden=True)
    return hidden_BTD, {}
  collections = [moe.STATS] + ([MTP] if mtp and _mtp_depth(model) else [])
  (hidden_BTD, _), extras = model.apply({"params": params, **model_state}, *args,
                                        return_hidden=True, mutable=collections)
  return hidden_BTD, extras


def policy_forward(model, params, model_state, batch: dict[str, jax.Array]
                   ) -> tuple[jax.Array, jax.Array, dict]:
  """(hidden_BTD at every position but the last, the output projection w_DV,
  the model's extras): what the RL losses need, logits never built."""
  hidden_BTD, extras = forward(model, params, model_state or {}, batch)
  w_DV = output_weights_DV(model.config, params).astype(model.config.dtype)
  return hidden_BTD[:, :-1], w_DV, extras


def mtp_targets(targets_BT: jax.Array, weights_BT: jax.Array, k: int):
  """Targets and weights of MTP depth k: position i predicts targets[i + k] and
  counts only when i..i+k all carry loss weight (one document)."""
  shift = lambda x, j: jnp.pad(x[:, j:], ((0, 0), (0, j)))
  w_BT = weights_BT
  for j in range(1, k + 1):
    w_BT = w_BT * shift(weights_BT, j)
  return shift(targets_BT, k), w_BT


def auxiliary_loss(model, extras: dict, *, w_DV: Optional[jax.Array] = None,
                   batch: Optional[dict] = None, impl: str = "auto"
                   ) -> tuple[Optional[jax.Array], dict[str, jax.Array]]:
  """aux_loss_weight · Σ_layers balance loss + mtp_loss_weight · mean_k MTP
  cross-entropy (the latter needs `w_DV` and the batch's targets/loss_weights).
  Returns (loss or None when the model has no extras, metrics)."""
  if not extras:
    return None, {}
  c = model.config
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  if moe.STATS in extras and c.aux_loss_weight:
    total = total + c.aux_loss_weight * moe.balance_loss(extras[moe.STATS])
  if MTP in extras:
    depth = _mtp_depth(model)
    losses = []
    for k in range(1, depth + 1):
      targets_BT, weights_BT = mtp_targets(batch["targets"], batch["loss_weights"], k)
      ce, _ = hidden_cross_entropy(extras[MTP][f"hidden_{k}"][0], w_DV, targets_BT, weights_BT,
                                   impl=impl)
      losses.append(ce)
      metrics[f"mtp_loss/depth_{k}"] = ce
    metrics["mtp_loss"] = sum(losses) / depth
    total = total + c.mtp_loss_weight * metrics["mtp_loss"]
  return total, metrics


def update_model_state(model, model_state: Any, extras: dict) -> Any:
  """The model state after a step: each router bias moves ±bias_update_rate
  towards balance from this step's loads. Unchanged without MoE."""
  if moe.STATE not in model_state or moe.STATS not in extras:
    return model_state
  rate = model.config.bias_update_rate
  return {**model_state,
          moe.STATE: moe.update_router_bias(model_state[moe.STATE], extras[moe.STATS], rate)}


def metrics(model_state: Any, extras: dict) -> dict[str, jax.Array]:
  """Per-layer expert load max/mean, dropped fraction and bias norm (MoE only)."""
  if moe.STATS not in extras:
    return {}
  return moe.moe_metrics(model_state.get(moe.STATE, {}), extras[moe.STATS])

"""GRPO loss (DeepSeekMath / R1) with DAPO clip-higher and Dr.GRPO aggregation.

The objective, per completion token t of completion i (design.md §1):

    ρ_it  = exp(logp_it - old_logp_it)
    obj_it = min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i) - β KL_it
    KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          # k3
    loss  = -aggregate(obj)

With μ = 1 (one policy update per rollout batch) old_logp == logp, so ρ ≡ 1
and the loss value is just -aggregate(A) (≈ 0 for group-normalised A), but the
gradient is not zero: ∇ρ = ρ ∇logp = ∇logp, i.e. the policy-gradient term.

`GRPOLoss` takes log-probs; `GRPOLoss.from_hidden` takes the final hidden
states and the output projection and gets the per-token terms from the fused
kernel (r1jax.kernels), so the [B, T, V] logits never exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from r1jax.kernels import grpo_token_terms, token_logprobs_and_clip

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def group_advantages(rewards_BG: jax.Array, *, scale_by_std: bool = True,
                     eps: float = 1e-4, std_ddof: int = 0) -> jax.Array:
  """Group-normalised advantages A = (r - mean_G r) / (std_G r + eps).

  Args:
    rewards_BG: rewards of the G completions of each of B prompts.
    scale_by_std: divide by the group std (off = Dr.GRPO: mean-centring only).
    eps: added to the std, keeps all-equal groups finite.
    std_ddof: 0 = population std (our default, as in DeepSeekMath's formula
      read literally); 1 = unbiased std, which is what TRL uses
      (`torch.std`), for parity with TRL runs.

  Returns:
    advantages_BG (float32). A group whose rewards are all equal gets exactly 0.
  """
  if rewards_BG.ndim != 2:
    raise ValueError(f"rewards_BG must be [B, G], got shape {rewards_BG.shape}")
  if std_ddof not in (0, 1):
    raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof}")
  if std_ddof >= rewards_BG.shape[1]:
    raise ValueError(f"std_ddof={std_ddof} needs a group size G > {std_ddof}, "
                     f"got G={rewards_BG.shape[1]}")
  r_BG = rewards_BG.astype(jnp.float32)
  # Shift by the group's first reward before averaging: for an all-equal group
  # the shifted values are exactly 0, so the advantage is exactly 0.0 whatever
  # rounding sum(r)/G would have (e.g. 3 × 0.1 in float32 is not 0.3).
  d_BG = r_BG - r_BG[:, :1]
  centred_BG = d_BG - jnp.mean(d_BG, axis=1, keepdims=True)
  if not scale_by_std:
    return centred_BG
  std_B1 = jnp.std(d_BG, axis=1, keepdims=True, ddof=std_ddof)
  return centred_BG / (std_B1 + eps)


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
  """log_softmax(logits / temperature) at `tokens_BT`, float32 (logp_BT)."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp_BTV, tokens_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


class GRPOLoss(nn.Module):
  """GRPO clipped surrogate with k3 KL; no parameters (`.apply({}, ...)`).

  Aggregations (all masked):
    seq_mean_token_mean: mean over sequences of (Σ_t obj / Σ_t mask) — the
      paper. Fully masked sequences are excluded from the mean over sequences
      (divided by max(#non-empty, 1)), so a truncation-masked completion does
      not dilute the rest of the batch.
    token_mean: Σ obj / Σ mask over the whole batch — DAPO.
    seq_mean_token_sum_norm: mean over ALL B sequences of
      (Σ_t obj / max_completion_length) — Dr.GRPO. Empty sequences count as 0:
      a constant normaliser independent of the batch contents is the point of
      Dr.GRPO (and matches TRL's `dr_grpo`).
  """
  beta: float = 0.001  # KL weight (R1: 0.001, DeepSeekMath: 0.04)
  epsilon_low: float = 0.2  # ratio clip below: 1 - epsilon_low
  epsilon_high: float = 0.2  # ratio clip above: 1 + epsilon_high (DAPO: 0.28)
  loss_aggregation: str = "seq_mean_token_mean"  # one of AGGREGATIONS
  max_completion_length: int | None = None  # tokens; normaliser of seq_mean_token_sum_norm
  mask_truncated: bool = False  # zero the whole mask of completions without EOS

  def __post_init__(self):
    if self.beta < 0:
      raise ValueError(f"GRPOLoss.beta must be >= 0, got {self.beta}")
    if not 0 <= self.epsilon_low < 1:
      raise ValueError(f"GRPOLoss.epsilon_low must be in [0, 1), got {self.epsilon_low}")
    if self.epsilon_high < 0:
      raise ValueError(f"GRPOLoss.epsilon_high must be >= 0, got {self.epsilon_high}")
    if self.loss_aggregation not in AGGREGATIONS:
      raise ValueError(f"GRPOLoss.loss_aggregation must be one of {AGGREGATIONS}, "
                       f"got {self.loss_aggregation!r}")
    if self.loss_aggregation == "seq_mean_token_sum_norm" and (
        self.max_completion_length is None or self.max_completion_length <= 0):
      raise ValueError("GRPOLoss.max_completion_length must be a positive int with "
                       f"loss_aggregation='seq_mean_token_sum_norm', got {self.max_completion_length}")
    super().__post_init__()

  def __call__(self, logp_BT: jax.Array, old_logp_BT: jax.Array,
               ref_logp_BT: jax.Array | None, advantages_B: jax.Array,
               mask_BT: jax.Array, truncated_B: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss and metrics.

    Args:
      logp_BT: log π_θ of the completion tokens (logits / sampling temperature).
      old_logp_BT: log π_old of the same tokens (gradient stopped here).
      ref_logp_BT: log π_ref (gradient stopped); may be None only when beta == 0.
      advantages_B: one advantage per completion.
      mask_BT: 1 on real completion tokens, 0 on padding.
      truncated_B: True for completions that hit the length limit without EOS;
        required when mask_truncated.

    Returns:
      (loss, metrics) with float32 scalar metrics `kl`, `clip_ratio/low_mean`,
      `clip_ratio/high_mean`, `clip_ratio/region_mean`, `ratio/mean`.
    """
    keep_BT = self._keep(logp_BT.shape, old_logp_BT, ref_logp_BT, advantages_B, mask_BT,
                         truncated_B)
    stop = lambda x: None if x is None else jax.lax.stop_gradient(x.astype(jnp.float32))
    obj_BT, ratio_BT, kl_BT = grpo_token_terms(
        logp_BT.astype(jnp.float32), stop(old_logp_BT), stop(ref_logp_BT),
        stop(advantages_B)[:, None], keep_BT, epsilon_low=self.epsilon_low,
        epsilon_high=self.epsilon_high, beta=self.beta)
    return self._aggregate(obj_BT, ratio_BT, kl_BT, advantages_B, keep_BT)

  def from_hidden(self, hidden_BTD: jax.Array, w_DV: jax.Array, tokens_BT: jax.Array,
                  old_logp_BT: jax.Array, ref_logp_BT: jax.Array | None,
                  advantages_B: jax.Array, mask_BT: jax.Array,
                  truncated_B: jax.Array | None = None, *, temperature: float = 1.0,
                  impl: str = "auto") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The same loss from final hidden states and the output projection.

    log π_θ(tokens_BT) under (hidden_BTD · w_DV) / temperature and the per-token
    GRPO terms come from `r1jax.kernels.token_logprobs_and_clip` (`impl`: one of
    r1jax.kernels.IMPLS); only `reference` materialises the [B, T, V] logits.
    Metrics are __call__'s plus `entropy` (mean over mask_BT, gradient stopped).
    """
    keep_BT = self._keep(tokens_BT.shape, old_logp_BT, ref_logp_BT, advantages_B, mask_BT,
                         truncated_B)
    terms = token_logprobs_and_clip(
        hidden_BTD, w_DV, tokens_BT, old_logp_BT, advantages_B, keep_BT,
        ref_logp_BT if self.beta > 0 else None, temperature=temperature,
        epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
        with_entropy=True, impl=impl)
    loss, metrics = self._aggregate(terms.objective, terms.ratio, terms.kl, advantages_B, keep_BT)
    m_BT = mask_BT.astype(jnp.float32)
    metrics["entropy"] = jax.lax.stop_gradient(
        jnp.sum(terms.entropy * m_BT) / jnp.maximum(jnp.sum(m_BT), 1.0))
    return loss, metrics

  def _keep(self, shape, old_logp_BT, ref_logp_BT, advantages_B, mask_BT, truncated_B):
    """Checks the inputs; the tokens that enter the loss (mask, minus truncated rows)."""
    B, T = shape
    for name, x in (("old_logp_BT", old_logp_BT), ("ref_logp_BT", ref_logp_BT),
                    ("mask_BT", mask_BT)):
      if x is not None and x.shape != (B, T):
        raise ValueError(f"{name} has shape {x.shape}, expected {(B, T)}")
    if advantages_B.shape != (B,):
      raise ValueError(f"advantages_B has shape {advantages_B.shape}, expected {(B,)}")
    if self.beta > 0 and ref_logp_BT is None:
      raise ValueError(f"ref_logp_BT is None but GRPOLoss.beta={self.beta} > 0 "
                       "needs reference log-probs (set beta=0 to drop the KL term)")
    keep_BT = mask_BT.astype(bool)
    if self.mask_truncated:
      if truncated_B is None:
        raise ValueError("GRPOLoss.mask_truncated=True needs truncated_B")
      if truncated_B.shape != (B,):
        raise ValueError(f"truncated_B has shape {truncated_B.shape}, expected {(B,)}")
      keep_BT = keep_BT & ~truncated_B.astype(bool)[:, None]
    return keep_BT

  def _aggregate(self, obj_BT, ratio_BT, kl_BT, advantages_B, keep_BT):
    """-aggregate(obj) over the kept tokens, and the metrics."""
    m_BT = keep_BT.astype(jnp.float32)
    adv_B1 = jax.lax.stop_gradient(advantages_B.astype(jnp.float32))[:, None]
    n_tok = jnp.maximum(jnp.sum(m_BT), 1.0)
    tok_B = jnp.sum(m_BT, axis=1)
    sum_B = jnp.sum(obj_BT * m_BT, axis=1)
    if self.loss_aggregation == "seq_mean_token_mean":
      nonempty_B = (tok_B > 0).astype(jnp.float32)
      per_seq_B = sum_B / jnp.maximum(tok_B, 1.0)
      objective = jnp.sum(per_seq_B * nonempty_B) / jnp.maximum(jnp.sum(nonempty_B), 1.0)
    elif self.loss_aggregation == "token_mean":
      objective = jnp.sum(sum_B) / n_tok
    else:  # seq_mean_token_sum_norm
      objective = jnp.mean(sum_B / float(self.max_completion_length))
    loss = -objective

    def masked_mean(x_BT):
      return jax.lax.stop_gradient(jnp.sum(x_BT.astype(jnp.float32) * m_BT) / n_tok)

    low_BT = (adv_B1 < 0) & (ratio_BT < 1.0 - self.epsilon_low)
    high_BT = (adv_B1 > 0) & (ratio_BT > 1.0 + self.epsilon_high)
    metrics = {
        "kl": masked_mean(kl_BT),
        "clip_ratio/low_mean": masked_mean(low_BT),
        "clip_ratio/high_mean": masked_mean(high_BT),
        "clip_ratio/region_mean": masked_mean(low_BT | high_BT),
        "ratio/mean": masked_mean(ratio_BT),
    }
    return loss, metrics

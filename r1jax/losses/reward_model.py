"""Bradley–Terry loss of a scalar reward model on (chosen, rejected) pairs
(R1 stage 4: the helpfulness/harmlessness reward models)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BradleyTerryLoss(nn.Module):
  """-log σ(r_chosen - r_rejected - margin), averaged over pairs; no parameters.

  `center_weight` adds the auxiliary `w · mean((r_c + r_r)²)` that keeps the
  scores centred on 0 (InstructGPT / TRL's `center_rewards_coefficient`);
  0 disables it.
  """
  margin: float = 0.0  # required score gap (0: plain Bradley–Terry)
  center_weight: float = 0.0

  def __call__(self, chosen_B: jax.Array, rejected_B: jax.Array,
               weights_B: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics) for scalar scores of B pairs.

    Args:
      chosen_B, rejected_B: reward-model scores of the preferred and the other answer.
      weights_B: 1 for real pairs, 0 for padding (default: all 1).
    Returns:
      (loss, {"accuracy": share of pairs ranked right, "margin": mean r_c - r_r}).
    """
    chosen_B = chosen_B.astype(jnp.float32)
    rejected_B = rejected_B.astype(jnp.float32)
    if weights_B is None:
      weights_B = jnp.ones_like(chosen_B)
    weights_B = weights_B.astype(jnp.float32)
    n = jnp.maximum(weights_B.sum(), 1.0)
    diff_B = chosen_B - rejected_B
    # -log σ(x) = softplus(-x), stable for large |x|.
    loss = jnp.sum(jax.nn.softplus(-(diff_B - self.margin)) * weights_B) / n
    if self.center_weight:
      loss = loss + self.center_weight * jnp.sum((chosen_B + rejected_B) ** 2 * weights_B) / n
    metrics = {"accuracy": jnp.sum((diff_B > 0) * weights_B) / n,
               "margin": jnp.sum(diff_B * weights_B) / n}
    return loss, metrics

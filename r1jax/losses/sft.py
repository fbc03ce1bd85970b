"""Masked next-token cross-entropy (pretraining, SFT and distillation on teacher samples)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from r1jax.kernels import token_logprobs_and_clip


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                         weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy over weighted positions; returns (loss, weight sum)."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  total = jnp.sum(weights_BT)
  return jnp.sum(ce_BT * weights_BT) / jnp.maximum(total, 1.0), total


def hidden_cross_entropy(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                         weights_BT: jax.Array, *, impl: str = "auto"
                         ) -> tuple[jax.Array, jax.Array]:
  """`masked_cross_entropy` of the logits hidden_BTD · w_DV, through the `impl`
  kernel (r1jax.kernels.IMPLS): only `reference` materialises the logits.

  Also the sequence-level distillation loss of R1 (SFT of a student on teacher
  samples): Σ_t of it per row is -log p_student(teacher sequence).
  """
  logp_BT = token_logprobs_and_clip(hidden_BTD, w_DV, targets_BT, impl=impl).logp
  total = jnp.sum(weights_BT)
  return -jnp.sum(logp_BT * weights_BT) / jnp.maximum(total, 1.0), total

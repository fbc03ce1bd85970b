"""Masked next-token cross-entropy (pretraining and SFT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                         weights_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy over weighted positions; returns (loss, weight sum)."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT)
  total = jnp.sum(weights_BT)
  return jnp.sum(ce_BT * weights_BT) / jnp.maximum(total, 1.0), total

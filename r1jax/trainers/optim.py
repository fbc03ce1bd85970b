"""Optimizer from config: AdamW, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(c: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to `c.learning_rate`, then cosine decay to `c.final_lr_fraction` of it."""
  warmup = min(c.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=c.learning_rate * c.final_lr_fraction)


def _decay_mask(params):
  # Weight decay on matrices only: norms' scales and biases are left alone.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(c: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with clipping; `c` is `config.optim`."""
  return optax.chain(
      optax.clip_by_global_norm(c.clip_grad_norm),
      optax.adamw(learning_rate_schedule(c, num_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                  weight_decay=c.weight_decay, mask=_decay_mask))

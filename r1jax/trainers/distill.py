"""Token-level distillation: the SFT loop (r1jax.trainers.sft) with a step
that matches the student's next-token distribution to the teacher's on the
same tokens (r1jax.losses.distill.TokenKDLoss), mixed with the plain
next-token loss on those tokens.

R1's own distillation is sequence-level (SFT on the teacher's samples, the
default `distill.method`); this is the option. Teacher and student share the
tokenizer. The teacher's logits are computed inside the step from its params
(jit arguments, not constants); both logits [B, T, V] are materialised, so
this path is for vocabularies and batches where that fits (no chunked KD
kernel yet).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from r1jax.losses.distill import TokenKDLoss
from r1jax.losses.sft import masked_cross_entropy
from r1jax.models.transformer import output_weights_DV
from r1jax.trainers import model_aux
from r1jax.trainers.state import TrainState, apply_gradients


def full_logits(model, params, model_state, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Float32 logits [B, T, V] of `batch` and the model's extras."""
  hidden_BTD, extras = model_aux.forward(model, params, model_state or {}, batch)
  w_DV = output_weights_DV(model.config, params)
  return jnp.einsum("btd,dv->btv", hidden_BTD.astype(jnp.float32), w_DV.astype(jnp.float32)), extras


def kd_train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any,
                  teacher_model_state: Any, *, model, teacher_model, loss: TokenKDLoss,
                  kd_weight: float, tx: optax.GradientTransformation
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on kd_weight · KD + (1 - kd_weight) · cross-entropy,
  both over `batch["loss_weights"]` (the completion tokens); skips non-finite updates."""
  teacher_BTV = jax.lax.stop_gradient(
      full_logits(teacher_model, teacher_params, teacher_model_state, batch)[0])

  def loss_fn(params):
    student_BTV, extras = full_logits(model, params, state.model_state, batch)
    kd, kd_metrics = loss.apply({}, student_BTV, teacher_BTV, batch["loss_weights"])
    ce, num_tokens = masked_cross_entropy(student_BTV, batch["targets"], batch["loss_weights"])
    objective = kd_weight * kd + (1.0 - kd_weight) * ce
    aux, aux_metrics = model_aux.auxiliary_loss(model, extras)
    if aux is not None:
      objective = objective + aux
    return objective, (ce, num_tokens, kd, kd_metrics, extras, aux_metrics)

  (objective, (ce, num_tokens, kd, kd_metrics, extras, aux_metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, guard = apply_gradients(
      state, grads, objective, tx,
      model_state=model_aux.update_model_state(model, state.model_state, extras))
  metrics = dict(loss=ce, num_tokens=num_tokens, kd_loss=kd, objective=objective,
                 **{f"kd/{k}": v for k, v in kd_metrics.items()}, **guard, **aux_metrics,
                 **model_aux.metrics(new_state.model_state, extras))
  return new_state, metrics

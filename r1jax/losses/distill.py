"""Token-level knowledge distillation: KL from the teacher's next-token
distribution to the student's, at a temperature (Hinton et al.).

R1's own distillation is sequence-level (SFT of the student on teacher
samples: `r1jax.losses.sft.hidden_cross_entropy`); this is the token-level
option. Teacher and student must share the tokenizer (same V).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

DIRECTIONS = ("forward", "reverse")


class TokenKDLoss(nn.Module):
  """τ² · Σ_t w_t KL_t / Σ_t w_t, with KL_t between softmax(teacher/τ) and softmax(student/τ).

  `forward` = KL(teacher ‖ student) (mass-covering, the classic KD);
  `reverse` = KL(student ‖ teacher) (mode-seeking, as in MiniLLM / on-policy
  distillation). The τ² factor keeps gradient magnitudes comparable across
  temperatures. No parameters (`.apply({}, ...)`).
  """
  temperature: float = 1.0
  direction: str = "forward"

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"TokenKDLoss.temperature must be > 0, got {self.temperature}")
    if self.direction not in DIRECTIONS:
      raise ValueError(f"TokenKDLoss.direction must be one of {DIRECTIONS}, got {self.direction!r}")
    super().__post_init__()

  def __call__(self, student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array,
               weights_BT: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, {"kl": mean per-token KL at τ, "agreement": argmax match rate}).

    Args:
      student_logits_BTV: the student's logits (gradients flow here).
      teacher_logits_BTV: the teacher's logits on the same tokens (gradient stopped).
      weights_BT: 1 on the positions to distil (completion tokens), 0 elsewhere.
    """
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
      raise ValueError(f"student logits {student_logits_BTV.shape} and teacher logits "
                       f"{teacher_logits_BTV.shape} differ (same tokenizer needed)")
    tau = self.temperature
    s_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / tau, axis=-1)
    t_BTV = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits_BTV).astype(jnp.float32) / tau, axis=-1)
    p_log, q_log = (t_BTV, s_BTV) if self.direction == "forward" else (s_BTV, t_BTV)
    kl_BT = jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)
    w_BT = weights_BT.astype(jnp.float32)
    n = jnp.maximum(w_BT.sum(), 1.0)
    kl = jnp.sum(kl_BT * w_BT) / n
    agree = jnp.sum((jnp.argmax(s_BTV, -1) == jnp.argmax(t_BTV, -1)) * w_BT) / n
    return tau ** 2 * kl, {"kl": kl, "agreement": agree}

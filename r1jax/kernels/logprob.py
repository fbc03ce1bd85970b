"""Token log-probs, entropy and the GRPO per-token terms straight from the final
hidden states and the output projection, without materialising the logits.

    z_tv   = (h_t · w_v) / temperature                 # float32 accumulation
    logp_t = z_t,tok - logsumexp_v z_tv
    H_t    = logsumexp_v z_tv - Σ_v softmax(z_t)_v z_tv
    then the GRPO epilogue on logp_t (`grpo_token_terms`): ratio, clipped
    surrogate and k3 KL.

Three implementations behind one signature (design.md §2, "kernels have twins"):
  reference  materialises the [B, T, V] logits in float32: the oracle.
  chunked    plain XLA over sequence × vocab tiles with an online log-sum-exp; keeps
             only the log-sum-exp as a residual and recomputes each tile in a
             `jax.custom_vjp` backward (logprob_chunked.py).
  pallas     the same as a Pallas kernel with the GRPO epilogue fused into the
             last vocab step (logprob_pallas.py); runs with interpret=True off TPU.
`auto` picks pallas on a single-device TPU and chunked elsewhere: CPU, GPU (the
kernel is TPU-only, see logprob_pallas.py) and multi-device meshes (see
`resolve_impl`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from r1jax.kernels import logprob_chunked, logprob_pallas

IMPLS = ("auto", "reference", "chunked", "pallas")


class TokenTerms(NamedTuple):
  """Per-token outputs, float32, shaped like the tokens. Fields not asked for are None."""

  logp: jax.Array  # log π(token) under logits / temperature
  entropy: Optional[jax.Array]  # entropy of π (with_entropy)
  objective: Optional[jax.Array]  # min(ρA, clip(ρ)A) - β KL; 0 on tokens not kept
  ratio: Optional[jax.Array]  # ρ = exp(logp - old_logp); 1 on tokens not kept
  kl: Optional[jax.Array]  # k3 KL to the reference; 0 on tokens not kept or when beta == 0


def resolve_impl(impl: str) -> str:
  """`auto` -> pallas on a single TPU, chunked elsewhere; other names are checked and returned."""
  if impl not in IMPLS:
    raise ValueError(f"loss.impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    # pallas_call has no SPMD partitioning rule: under a multi-device jit its
    # operands would be gathered and every device would do all the work, so
    # until it is wrapped in a shard_map, auto keeps the XLA version there.
    single_tpu = jax.default_backend() == "tpu" and jax.device_count() == 1
    return "pallas" if single_tpu else "chunked"
  return impl


def impl_from_config(config) -> str:
  """The `loss.impl` switch of an experiment config; `auto` when the section is absent."""
  impl = config.get("loss", {}).get("impl", "auto")
  if impl not in IMPLS:
    raise ValueError(f"config loss.impl must be one of {IMPLS}, got {impl!r}")
  return impl


def grpo_token_terms(logp, old_logp, ref_logp, advantages, keep, *, epsilon_low: float,
                     epsilon_high: float, beta: float):
  """GRPO's per-token (objective, ratio, kl), elementwise on same-shaped arrays.

  Padding values are replaced by 0 before any exp: garbage (e.g. -inf) there
  would otherwise make NaN gradients through the masked-out branch. `ref_logp`
  is unused (may be None) when beta == 0. Also the fused epilogue of the
  Pallas kernel, so it uses only elementwise ops.
  """
  logp = jnp.where(keep, logp, 0.0)
  old = jnp.where(keep, old_logp, 0.0)
  ratio = jnp.exp(logp - old)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  objective = jnp.minimum(ratio * advantages, clipped * advantages)
  if beta > 0:
    d = jnp.where(keep, ref_logp, 0.0) - logp
    kl = jnp.where(keep, jnp.exp(d) - d - 1.0, 0.0)
    objective = objective - beta * kl
  else:
    kl = jnp.zeros_like(logp)
  return jnp.where(keep, objective, 0.0), ratio, kl


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything that fixes the traced program (hashable: a custom_vjp nondiff arg)."""

  impl: str
  temperature: float
  with_entropy: bool
  epsilon_low: float
  epsilon_high: float
  beta: float
  block_t: Optional[int]
  block_v: Optional[int]
  interpret: Optional[bool]

  def epilogue(self, logp, old, ref, adv, keep):
    """(objective, ratio, kl) from logp and the GRPO token inputs (keep as 0/1 floats)."""
    return grpo_token_terms(logp, old, ref, adv, keep > 0, epsilon_low=self.epsilon_low,
                            epsilon_high=self.epsilon_high, beta=self.beta)

  def blocks(self) -> dict:
    return {k: v for k, v in (("block_t", self.block_t), ("block_v", self.block_v)) if v}


def token_logprobs_and_clip(
    hidden_BTD: jax.Array, w_DV: jax.Array, tokens_BT: jax.Array,
    old_logp_BT: Optional[jax.Array] = None, advantages_B: Optional[jax.Array] = None,
    mask_BT: Optional[jax.Array] = None, ref_logp_BT: Optional[jax.Array] = None, *,
    temperature: float = 1.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
    beta: float = 0.0, with_entropy: bool = False, impl: str = "auto",
    block_t: Optional[int] = None, block_v: Optional[int] = None,
    interpret: Optional[bool] = None) -> TokenTerms:
  """Per-token log-prob (and entropy, GRPO terms) of `tokens_BT` under softmax(h w / τ).

  Args:
    hidden_BTD: final normed hidden states (any float dtype; bf16 is accumulated in f32).
    w_DV: output projection (the tied embedding transposed, or lm_head). Both are
      cast to their common dtype; gradients come back in the input dtypes.
    tokens_BT: int targets in [0, V).
    old_logp_BT, advantages_B, mask_BT: GRPO inputs (all or none): log π_old,
      one advantage per row, 1 on the tokens that enter the loss. Without them
      only logp (and entropy) are computed: the SFT / distillation path.
    ref_logp_BT: log π_ref, needed when beta > 0.
    temperature, epsilon_low, epsilon_high, beta: as in GRPOLoss.
    with_entropy: also return the entropy (differentiable).
    impl: one of IMPLS.
    block_t, block_v: tile sizes of chunked/pallas (None = their defaults):
      block_t counts sequence positions (times all B rows) in chunked, rows of
      the flattened B·T tokens in pallas.
    interpret: Pallas interpret mode; None = interpret unless the backend is TPU.

  Returns:
    TokenTerms of float32 [B, T] arrays. Gradients flow to hidden_BTD and w_DV
    only; the GRPO inputs are treated as constants.
  """
  B, T, D = hidden_BTD.shape
  if w_DV.ndim != 2 or w_DV.shape[0] != D:
    raise ValueError(f"w_DV has shape {w_DV.shape}, expected [{D}, V] "
                     f"for hidden_BTD of shape {hidden_BTD.shape}")
  if tokens_BT.shape != (B, T):
    raise ValueError(f"tokens_BT has shape {tokens_BT.shape}, expected {(B, T)}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  grpo = old_logp_BT is not None
  if grpo != (advantages_B is not None) or grpo != (mask_BT is not None):
    raise ValueError("old_logp_BT, advantages_B and mask_BT go together (GRPO terms) or not at all")
  if grpo and beta > 0 and ref_logp_BT is None:
    raise ValueError(f"beta={beta} > 0 needs ref_logp_BT")
  for name, x in (("old_logp_BT", old_logp_BT), ("mask_BT", mask_BT), ("ref_logp_BT", ref_logp_BT)):
    if x is not None and x.shape != (B, T):
      raise ValueError(f"{name} has shape {x.shape}, expected {(B, T)}")
  if grpo and advantages_B.shape != (B,):
    raise ValueError(f"advantages_B has shape {advantages_B.shape}, expected {(B,)}")

  s = _Static(impl=resolve_impl(impl), temperature=float(temperature),
              with_entropy=with_entropy, epsilon_low=float(epsilon_low),
              epsilon_high=float(epsilon_high), beta=float(beta), block_t=block_t,
              block_v=block_v, interpret=interpret)
  dtype = jnp.promote_types(hidden_BTD.dtype, w_DV.dtype)
  h_BTD, w_DV = hidden_BTD.astype(dtype), w_DV.astype(dtype)
  tok_BT = tokens_BT.astype(jnp.int32)
  token_inputs = None
  if grpo:
    f32 = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))
    ref = jnp.zeros_like(old_logp_BT) if ref_logp_BT is None else ref_logp_BT
    adv_BT = jnp.broadcast_to(advantages_B[:, None], (B, T))
    token_inputs = (f32(old_logp_BT), f32(ref), f32(adv_BT), f32(mask_BT))
  fn = _reference if s.impl == "reference" else _streamed
  return TokenTerms(*fn(h_BTD, w_DV, tok_BT, token_inputs, s))


# ---------------------------------------------------------------------------
# reference: full float32 logits, autodiff.
# ---------------------------------------------------------------------------

def _reference(h_BTD, w_DV, tok_BT, token_inputs, s: _Static):
  z_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)
  logp_BTV = jax.nn.log_softmax(z_BTV / s.temperature, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, tok_BT[..., None], axis=-1)[..., 0]
  entropy_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1) if s.with_entropy else None
  terms = (None,) * 3 if token_inputs is None else s.epilogue(logp_BT, *token_inputs)
  return (logp_BT, entropy_BT, *terms)


# ---------------------------------------------------------------------------
# chunked / pallas: tiled forward, tile-recomputing backward.
# ---------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _streamed(h_BTD, w_DV, tok_BT, token_inputs, s: _Static):
  return _streamed_fwd(h_BTD, w_DV, tok_BT, token_inputs, s)[0]


def _streamed_fwd(h_BTD, w_DV, tok_BT, token_inputs, s: _Static):
  if s.impl == "pallas":
    # The epilogue runs inside the kernel, on the last vocab tile of each token tile.
    logp_BT, entropy_BT, lse_BT, terms = logprob_pallas.forward(
        h_BTD, w_DV, tok_BT, token_inputs, temperature=s.temperature,
        with_entropy=s.with_entropy, epilogue=None if token_inputs is None else s.epilogue,
        interpret=s.interpret, **s.blocks())
  else:
    logp_BT, entropy_BT, lse_BT = logprob_chunked.forward(
        h_BTD, w_DV, tok_BT, temperature=s.temperature, with_entropy=s.with_entropy,
        **s.blocks())
    terms = None if token_inputs is None else s.epilogue(logp_BT, *token_inputs)
  terms = terms or (None,) * 3
  residuals = (h_BTD, w_DV, tok_BT, token_inputs, logp_BT, entropy_BT, lse_BT)
  return (logp_BT, entropy_BT, *terms), residuals


def _streamed_bwd(s: _Static, residuals, cotangents):
  h_BTD, w_DV, tok_BT, token_inputs, logp_BT, entropy_BT, lse_BT = residuals
  g_logp_BT, g_entropy_BT, *g_terms = cotangents
  if token_inputs is not None:
    # The epilogue is elementwise on [B, T]: its VJP in XLA costs nothing next
    # to the [B, T, V] tiles, and gives the total cotangent of logp.
    _, epilogue_vjp = jax.vjp(lambda lp: s.epilogue(lp, *token_inputs), logp_BT)
    g_logp_BT = g_logp_BT + epilogue_vjp(tuple(g_terms))[0]
  # d entropy / d z_v = -p_v (z_v - E_p[z]), and E_p[z] = lse - entropy.
  ez_BT = lse_BT - entropy_BT if s.with_entropy else None
  if s.impl == "pallas":
    backward = functools.partial(logprob_pallas.backward, interpret=s.interpret)
  else:
    backward = logprob_chunked.backward
  dh_BTD, dw_DV = backward(h_BTD, w_DV, tok_BT, lse_BT, g_logp_BT, ez_BT, g_entropy_BT,
                           temperature=s.temperature, **s.blocks())
  return dh_BTD.astype(h_BTD.dtype), dw_DV.astype(w_DV.dtype), None, None


_streamed.defvjp(_streamed_fwd, _streamed_bwd)

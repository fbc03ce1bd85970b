"""Token log-probs from hidden states as Pallas kernels (TPU), GRPO epilogue fused.

Forward: grid (token tiles, vocab tiles), the vocab axis last and sequential
("arbitrary"). Each step multiplies an [bt, D] block of h by a [D, bv] block
of w on the MXU (f32 accumulation), folds it into a running max / sum (and
Σ p·z for the entropy) held in VMEM scratch, and picks out the target's
logit. On the last vocab step it writes logp, entropy, lse and, when given,
the GRPO epilogue (ratio, clipped surrogate, k3 KL) for the token tile.
Backward (autodiff through pallas_call does not work; logprob.py wires these
into a `jax.custom_vjp`): two kernels that recompute each logits tile from
the saved lse, like flash attention's dq / dkv kernels —
  dh: grid (token tiles, vocab tiles), dh block resident over the vocab axis;
  dW: grid (vocab tiles, token tiles), dW block resident over the token axis.

Block shapes are TPU-legal: bt is a multiple of 8 or all N tokens, bv a
multiple of 128 or the whole vocabulary, D whole; per-token vectors are
[N, 1]. N and V need not divide the tiles: the grid covers the last partial
tile and rows/columns past the end are masked (their block contents are
undefined — NaN in interpret mode — so every use is a `where`, never a product
with 0).

Backends (checked with `python benchmarks/logprob_kernel.py --lowering`, and by
tests/test_logprob_kernel.py::test_pallas_lowers_for_tpu):
  TPU   forward and backward lower to Mosaic (`jax.export(..., platforms=["tpu"])`
        from a CPU host: three `tpu_custom_call`s; this lowering is where Pallas
        rejects illegal block shapes). Not compiled or run on a TPU here (no
        TPU on the dev machines): libtpu's Mosaic compiler is unverified. The
        kernel has no SPMD partitioning rule, so under a multi-device jit it
        needs a shard_map over the batch first; `auto` uses it on one TPU only.
  GPU   not supported: the kernel is written for Mosaic (TPU compiler params,
        VMEM scratch, a sequential vocab grid axis whose output block stays
        resident); Triton runs grid programs in parallel, so the accumulation
        scheme does not carry over. `jax.export(..., platforms=["cuda"])`
        fails ("Compiler params for platform tpu cannot be used for gpu
        lowering"). `auto` picks the chunked XLA version there.
  CPU   interpret mode only (`interpret=True`, the default off TPU): for tests.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK_T = 256  # tokens per tile (multiple of 8)
BLOCK_V = 512  # vocab entries per tile (multiple of 128)


def _tile(n: int, block: int, align: int, name: str) -> int:
  """The tile along a dim of size n: the whole dim if it fits, else `block`."""
  if n <= block:
    return n
  if block % align:
    raise ValueError(f"{name}={block} must be a multiple of {align} (TPU tiling)")
  return block


def _interpret(interpret: Optional[bool]) -> bool:
  return jax.default_backend() != "tpu" if interpret is None else interpret


def _col_row(shape, axis: int, offset, limit: int):
  """Index along `axis` of a block starting at `offset`, and whether it is < limit."""
  idx = offset + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  return idx, idx < limit


def _grad_logits(h, w, tok, lse, gl, ez, ge, col, valid, temperature: float):
  """d loss / d (h·w) of one tile: logp and entropy cotangents, 0 off the vocab."""
  z = jnp.dot(h, w, preferred_element_type=jnp.float32) / temperature
  p = jnp.where(valid, jnp.exp(z - lse), 0.0)
  dz = gl * ((col == tok).astype(jnp.float32) - p)
  if ge is not None:
    dz = dz - ge * p * (z - ez)
  return jnp.where(valid, dz / temperature, 0.0)


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------

def _forward_kernel(*refs, V: int, bv: int, temperature: float, with_entropy: bool,
                    epilogue: Optional[Callable]):
  n_grpo = 0 if epilogue is None else 4
  n_out = 3 + (0 if epilogue is None else 3)
  h_ref, w_ref, tok_ref = refs[:3]
  grpo_refs = refs[3:3 + n_grpo]
  out_refs = refs[3 + n_grpo:3 + n_grpo + n_out]
  m_ref, s0_ref, s1_ref, ztok_ref = refs[3 + n_grpo + n_out:]
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    s0_ref[...] = jnp.zeros(s0_ref.shape, jnp.float32)
    s1_ref[...] = jnp.zeros(s1_ref.shape, jnp.float32)
    ztok_ref[...] = jnp.zeros(ztok_ref.shape, jnp.float32)

  z = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32) / temperature
  col, valid = _col_row(z.shape, 1, j * bv, V)
  z = jnp.where(valid, z, -jnp.inf)
  m_old = m_ref[...]
  m_new = jnp.maximum(m_old, jnp.max(z, axis=1, keepdims=True))
  scale = jnp.exp(m_old - m_new)
  p = jnp.exp(z - m_new)
  s0_ref[...] = s0_ref[...] * scale + jnp.sum(p, axis=1, keepdims=True)
  if with_entropy:
    s1_ref[...] = s1_ref[...] * scale + jnp.sum(jnp.where(valid, p * z, 0.0), axis=1, keepdims=True)
  ztok_ref[...] += jnp.sum(jnp.where(col == tok_ref[...], z, 0.0), axis=1, keepdims=True)
  m_ref[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    lse = m_ref[...] + jnp.log(s0_ref[...])
    logp = ztok_ref[...] - lse
    entropy = lse - s1_ref[...] / s0_ref[...] if with_entropy else jnp.zeros_like(lse)
    outs = [logp, entropy, lse]
    if epilogue is not None:
      old, ref, adv, keep = (r[...] for r in grpo_refs)
      outs += list(epilogue(logp, old, ref, adv, keep))
    for r, x in zip(out_refs, outs):
      r[...] = x


def forward(h_BTD, w_DV, tok_BT, token_inputs=None, *, temperature: float, with_entropy: bool,
            epilogue: Optional[Callable] = None, block_t: int = BLOCK_T, block_v: int = BLOCK_V,
            interpret: Optional[bool] = None):
  """(logp_BT, entropy_BT or None, lse_BT, epilogue outputs or None), float32.

  The kernel sees the N = B·T tokens as rows. `epilogue(logp, old, ref, adv,
  keep) -> (objective, ratio, kl)` runs in it on [bt, 1] blocks of
  `token_inputs` = (old, ref, adv, keep), each [B, T] float32 (keep: 0 or 1).
  """
  B, T, D = h_BTD.shape
  N, V = B * T, w_DV.shape[1]
  bt, bv = _tile(N, block_t, 8, "block_t"), _tile(V, block_v, 128, "block_v")
  vec = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
  col = lambda x: x.reshape(N, 1)
  inputs = [h_BTD.reshape(N, D), w_DV, col(tok_BT)]
  in_specs = [pl.BlockSpec((bt, D), lambda i, j: (i, 0)),
              pl.BlockSpec((D, bv), lambda i, j: (0, j)), vec]
  num_out = 3
  if epilogue is not None:
    inputs += [col(x) for x in token_inputs]
    in_specs += [vec] * 4
    num_out = 6
  kernel = functools.partial(_forward_kernel, V=V, bv=bv, temperature=temperature,
                             with_entropy=with_entropy, epilogue=epilogue)
  outs = pl.pallas_call(
      kernel, grid=(pl.cdiv(N, bt), pl.cdiv(V, bv)), in_specs=in_specs,
      out_specs=[vec] * num_out,
      out_shape=[jax.ShapeDtypeStruct((N, 1), jnp.float32)] * num_out,
      scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32)] * 4,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=_interpret(interpret), name="token_logprobs_fwd",
  )(*inputs)
  logp_BT, entropy_BT, lse_BT, *terms = (x.reshape(B, T) for x in outs)
  return logp_BT, entropy_BT if with_entropy else None, lse_BT, tuple(terms) or None


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------

def _dh_kernel(*refs, V: int, bv: int, temperature: float):
  h_ref, w_ref, tok_ref, lse_ref, gl_ref, *ent_refs, dh_ref = refs
  ez, ge = (r[...] for r in ent_refs) if ent_refs else (None, None)
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    dh_ref[...] = jnp.zeros(dh_ref.shape, jnp.float32)

  w = w_ref[...]
  col, valid = _col_row((h_ref.shape[0], w.shape[1]), 1, j * bv, V)
  dz = _grad_logits(h_ref[...], w, tok_ref[...], lse_ref[...], gl_ref[...], ez, ge, col, valid,
                    temperature)
  # Columns past V hold undefined values: zero them, 0 * NaN would not be 0.
  _, w_valid = _col_row(w.shape, 1, j * bv, V)
  w = jnp.where(w_valid, w, jnp.zeros_like(w))
  dh_ref[...] += jax.lax.dot_general(dz.astype(w.dtype), w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)


def _dw_kernel(*refs, N: int, V: int, bt: int, bv: int, temperature: float):
  h_ref, w_ref, tok_ref, lse_ref, gl_ref, *ent_refs, dw_ref = refs
  ez, ge = (r[...] for r in ent_refs) if ent_refs else (None, None)
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)

  h = h_ref[...]
  col, valid = _col_row((h.shape[0], w_ref.shape[1]), 1, j * bv, V)
  _, row_valid = _col_row((h.shape[0], 1), 0, i * bt, N)
  dz = _grad_logits(h, w_ref[...], tok_ref[...], lse_ref[...], gl_ref[...], ez, ge, col,
                    valid & row_valid, temperature)
  # Rows past N hold undefined values: zero them, 0 * NaN would not be 0.
  h = jnp.where(row_valid, h, jnp.zeros_like(h))
  dw_ref[...] += jax.lax.dot_general(h, dz.astype(h.dtype), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)


def backward(h_BTD, w_DV, tok_BT, lse_BT, g_logp_BT, ez_BT=None, g_entropy_BT=None, *,
             temperature: float, block_t: int = BLOCK_T, block_v: int = BLOCK_V,
             interpret: Optional[bool] = None):
  """(dh_BTD, dw_DV) in float32 for cotangents of logp (and of entropy, with E_p[z] = ez_BT)."""
  B, T, D = h_BTD.shape
  N, V = B * T, w_DV.shape[1]
  bt, bv = _tile(N, block_t, 8, "block_t"), _tile(V, block_v, 128, "block_v")
  vectors = [tok_BT, lse_BT, g_logp_BT]
  if g_entropy_BT is not None:
    vectors += [ez_BT, g_entropy_BT]
  inputs = [h_BTD.reshape(N, D), w_DV] + [x.reshape(N, 1) for x in vectors]
  nt, nv = pl.cdiv(N, bt), pl.cdiv(V, bv)
  call = functools.partial(pl.pallas_call, interpret=_interpret(interpret), compiler_params=
                           pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")))

  def specs(tok_index, vocab_index):
    """In-specs for a grid whose (i, j) give the token / vocab tile through these maps."""
    vec = pl.BlockSpec((bt, 1), lambda a, b: (tok_index(a, b), 0))
    return [pl.BlockSpec((bt, D), lambda a, b: (tok_index(a, b), 0)),
            pl.BlockSpec((D, bv), lambda a, b: (0, vocab_index(a, b)))] + [vec] * len(vectors)

  dh_ND = call(
      functools.partial(_dh_kernel, V=V, bv=bv, temperature=temperature), grid=(nt, nv),
      in_specs=specs(lambda i, j: i, lambda i, j: j),
      out_specs=pl.BlockSpec((bt, D), lambda i, j: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((N, D), jnp.float32), name="token_logprobs_dh",
  )(*inputs)
  dw_DV = call(
      functools.partial(_dw_kernel, N=N, V=V, bt=bt, bv=bv, temperature=temperature),
      grid=(nv, nt), in_specs=specs(lambda j, i: i, lambda j, i: j),
      out_specs=pl.BlockSpec((D, bv), lambda j, i: (0, j)),
      out_shape=jax.ShapeDtypeStruct((D, V), jnp.float32), name="token_logprobs_dw",
  )(*inputs)
  return dh_ND.reshape(B, T, D), dw_DV

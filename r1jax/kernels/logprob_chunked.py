"""Token log-probs from hidden states in plain XLA, streamed over tiles.

A loop over sequence tiles of `block_t` positions (all B rows at once, so a
batch-sharded B stays sharded) and, inside it, over vocab tiles of `block_v`
entries with an online log-sum-exp: the largest temporary is one
[B, block_t, block_v] float32 tile, whatever T and V are. The backward
(logprob.py wires it into a `jax.custom_vjp`) recomputes each tile from the
saved log-sum-exp and accumulates dh and dW in place.

Ragged edges, without padding copies of h or w: the last tile along T (or V)
starts at T - block_t (V - block_v), so it overlaps the one before; the
overlap is masked out of every sum (the forward just rewrites identical values).

Under data parallelism each sequence tile's dW contribution is a reduction
over the sharded batch, i.e. one [D, block_v] all-reduce per (sequence tile,
vocab tile) unless XLA hoists it out of the loop; a `shard_map` over the batch
axes would reduce once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_T = 256  # sequence positions per tile (times B rows)
BLOCK_V = 4096  # vocab entries per tile


def _tile_start(i, size: int, total: int):
  """Start of tile i of `size` along a dim of `total`: the last one is clamped."""
  return jnp.minimum(i * size, total - size)


def _vocab_tile(h_BtD, w_DV, j, bv: int, temperature: float):
  """Logits of vocab tile j: (z_Btv f32, column ids, new columns, start, w_Dv)."""
  start = _tile_start(j, bv, w_DV.shape[1])
  w_Dv = jax.lax.dynamic_slice_in_dim(w_DV, start, bv, axis=1)
  z_Btv = jnp.einsum("BtD,Dv->Btv", h_BtD, w_Dv, preferred_element_type=jnp.float32) / temperature
  col_v = start + jnp.arange(bv)
  return z_Btv, col_v, col_v >= j * bv, start, w_Dv


def forward(h_BTD, w_DV, tok_BT, *, temperature: float, with_entropy: bool,
            block_t: int = BLOCK_T, block_v: int = BLOCK_V):
  """(logp_BT, entropy_BT or None, lse_BT), float32."""
  B, T, _ = h_BTD.shape
  V = w_DV.shape[1]
  bt, bv = min(block_t, T), min(block_v, V)

  def seq_step(i, outs_BT):
    start = _tile_start(i, bt, T)
    h_BtD = jax.lax.dynamic_slice_in_dim(h_BTD, start, bt, axis=1)
    tok_Bt = jax.lax.dynamic_slice_in_dim(tok_BT, start, bt, axis=1)

    def vocab_step(j, carry):
      m_Bt, s0_Bt, s1_Bt, ztok_Bt = carry
      z_Btv, col_v, new_v, _, _ = _vocab_tile(h_BtD, w_DV, j, bv, temperature)
      z_Btv = jnp.where(new_v, z_Btv, -jnp.inf)
      m_new = jnp.maximum(m_Bt, jnp.max(z_Btv, axis=-1))  # finite: each tile has a new column
      scale_Bt = jnp.exp(m_Bt - m_new)
      p_Btv = jnp.exp(z_Btv - m_new[..., None])
      s0_Bt = s0_Bt * scale_Bt + jnp.sum(p_Btv, axis=-1)
      if with_entropy:
        s1_Bt = s1_Bt * scale_Bt + jnp.sum(jnp.where(new_v, p_Btv * z_Btv, 0.0), axis=-1)
      hit_Btv = (col_v == tok_Bt[..., None]) & new_v
      ztok_Bt = ztok_Bt + jnp.sum(jnp.where(hit_Btv, z_Btv, 0.0), axis=-1)
      return m_new, s0_Bt, s1_Bt, ztok_Bt

    zeros = jnp.zeros((B, bt), jnp.float32)
    m_Bt, s0_Bt, s1_Bt, ztok_Bt = jax.lax.fori_loop(
        0, -(-V // bv), vocab_step, (jnp.full((B, bt), -jnp.inf), zeros, zeros, zeros))
    lse_Bt = m_Bt + jnp.log(s0_Bt)
    entropy_Bt = lse_Bt - s1_Bt / s0_Bt if with_entropy else zeros
    tile = (ztok_Bt - lse_Bt, entropy_Bt, lse_Bt)
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, x, start, axis=1)
                 for o, x in zip(outs_BT, tile))

  zeros = jnp.zeros((B, T), jnp.float32)
  logp_BT, entropy_BT, lse_BT = jax.lax.fori_loop(0, -(-T // bt), seq_step, (zeros,) * 3)
  return logp_BT, entropy_BT if with_entropy else None, lse_BT


def backward(h_BTD, w_DV, tok_BT, lse_BT, g_logp_BT, ez_BT=None, g_entropy_BT=None, *,
             temperature: float, block_t: int = BLOCK_T, block_v: int = BLOCK_V):
  """(dh_BTD, dw_DV) in float32 for cotangents of logp (and of entropy, with E_p[z] = ez_BT)."""
  B, T, D = h_BTD.shape
  V = w_DV.shape[1]
  bt, bv = min(block_t, T), min(block_v, V)
  with_entropy = g_entropy_BT is not None

  def seq_step(i, carry):
    dh_BTD, dw_DV = carry
    start = _tile_start(i, bt, T)
    new_t = start + jnp.arange(bt) >= i * bt
    tile = lambda x: jax.lax.dynamic_slice_in_dim(x, start, bt, axis=1)
    h_BtD, tok_Bt, lse_Bt = tile(h_BTD), tile(tok_BT), tile(lse_BT)
    # Positions shared with the previous tile get a zero cotangent: counted once.
    gl_Bt = jnp.where(new_t, tile(g_logp_BT), 0.0)
    if with_entropy:
      ez_Bt, ge_Bt = tile(ez_BT), jnp.where(new_t, tile(g_entropy_BT), 0.0)

    def vocab_step(j, carry):
      dh_BtD, dw_DV = carry
      z_Btv, col_v, new_v, vstart, w_Dv = _vocab_tile(h_BtD, w_DV, j, bv, temperature)
      p_Btv = jnp.where(new_v, jnp.exp(z_Btv - lse_Bt[..., None]), 0.0)
      hit_Btv = ((col_v == tok_Bt[..., None]) & new_v).astype(jnp.float32)
      dz_Btv = gl_Bt[..., None] * (hit_Btv - p_Btv)
      if with_entropy:
        dz_Btv = dz_Btv - ge_Bt[..., None] * p_Btv * (z_Btv - ez_Bt[..., None])
      dz_Btv = (dz_Btv / temperature).astype(h_BtD.dtype)
      dh_BtD = dh_BtD + jnp.einsum("Btv,Dv->BtD", dz_Btv, w_Dv, preferred_element_type=jnp.float32)
      # Columns shared with the previous tile have dz = 0: they add 0 here.
      dw_Dv = jax.lax.dynamic_slice_in_dim(dw_DV, vstart, bv, axis=1) + jnp.einsum(
          "BtD,Btv->Dv", h_BtD, dz_Btv, preferred_element_type=jnp.float32)
      return dh_BtD, jax.lax.dynamic_update_slice_in_dim(dw_DV, dw_Dv, vstart, axis=1)

    dh_BtD, dw_DV = jax.lax.fori_loop(0, -(-V // bv), vocab_step,
                                      (jnp.zeros((B, bt, D), jnp.float32), dw_DV))
    dh_BtD = tile(dh_BTD) + dh_BtD  # rows shared with the previous tile got dz = 0
    return jax.lax.dynamic_update_slice_in_dim(dh_BTD, dh_BtD, start, axis=1), dw_DV

  init = (jnp.zeros((B, T, D), jnp.float32), jnp.zeros((D, V), jnp.float32))
  return jax.lax.fori_loop(0, -(-T // bt), seq_step, init)

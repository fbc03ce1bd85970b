"""Fused log-prob kernel: `chunked` and `pallas` (interpret mode) against the
float32 `reference` and an independent float64 NumPy computation; the losses
built on it; and the Pallas kernel's lowering for TPU."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax.kernels import impl_from_config, resolve_impl, token_logprobs_and_clip
from r1jax.losses.grpo import GRPOLoss, token_logprobs
from r1jax.losses.sft import hidden_cross_entropy, masked_cross_entropy

# Ragged on purpose: neither T, V nor N = B·T is a multiple of a tile.
B, T, D, V = 3, 47, 32, 1000
BLOCKS = dict(block_t=16, block_v=128)
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
FIELDS = ("logp", "entropy", "objective", "ratio", "kl")
# (temperature, epsilon_low, epsilon_high, beta): symmetric clip with KL, clip-higher without.
OPTIONS = [(0.7, 0.2, 0.2, 0.04), (1.3, 0.2, 0.28, 0.0)]


def make_inputs(dtype, seed=0, temperature=1.0):
  """Random hidden states / projection and a rollout batch whose ratios cross both clip bounds."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  w = jnp.asarray(rng.normal(size=(D, V)) * 2 / np.sqrt(D), dtype)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  # π_old near the current policy: log-ratios in [-0.6, 0.6].
  z = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64)) / temperature
  logp = np.take_along_axis(z - _logsumexp(z), tokens[..., None], -1)[..., 0]
  old = logp - rng.uniform(-0.6, 0.6, (B, T))
  ref = logp + rng.normal(0, 0.3, (B, T))
  adv = np.array([1.3, -0.8, 0.5])
  lengths = np.array([T, 20, 33])
  mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  mask[1, 5:9] = 0.0  # a hole inside a row
  old[mask == 0], ref[mask == 0] = 50.0, np.inf  # garbage on padding must not matter
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return dict(h=h, w=w, tokens=jnp.asarray(tokens), old=f32(old), ref=f32(ref), adv=f32(adv),
              mask=f32(mask))


def _logsumexp(z):
  m = z.max(-1, keepdims=True)
  return m + np.log(np.exp(z - m).sum(-1, keepdims=True))


def cotangents(seed=1):
  """One random cotangent per output: their VJP covers every linear aggregation."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for _ in FIELDS]


@functools.lru_cache(maxsize=None)
def run(impl, dtype, option):
  """Outputs and (d/dh, d/dw) of Σ cotangent · output, as float64 NumPy."""
  temperature, eps_low, eps_high, beta = option
  x = make_inputs(dtype, temperature=temperature)
  cts = cotangents()

  @jax.jit
  def f(h, w):
    terms = token_logprobs_and_clip(
        h, w, x["tokens"], x["old"], x["adv"], x["mask"], x["ref"], temperature=temperature,
        epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, with_entropy=True, impl=impl,
        **BLOCKS)
    return sum(jnp.sum(c * t) for c, t in zip(cts, terms)), terms

  (_, terms), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x["h"], x["w"])
  as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  return [as64(t) for t in terms], [as64(g) for g in grads]


def assert_close(got, want, rtol, name):
  """|got - want| <= rtol · (|want| + max|want|), and nothing non-finite passes."""
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  assert np.all(np.isfinite(want)), f"{name}: non-finite reference"
  scale = np.abs(want).max()
  if scale == 0:  # e.g. kl with beta = 0
    assert np.all(got == 0), name
    return
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_matches_reference(impl, dtype, option):
  want_terms, want_grads = run("reference", dtype, option)
  got_terms, got_grads = run(impl, dtype, option)
  for name, got, want in zip(FIELDS, got_terms, want_terms):
    assert_close(got, want, TOL[dtype], name)
  for name, got, want in zip(("d/dh", "d/dw"), got_grads, want_grads):
    assert_close(got, want, TOL[dtype], name)


def numpy_terms_and_grads(x, cts, temperature, eps_low, eps_high, beta):
  """float64 outputs and VJP straight from the formulas (no JAX)."""
  h, w = (np.asarray(jnp.asarray(x[k], jnp.float32), np.float64) for k in ("h", "w"))
  tokens = np.asarray(x["tokens"])
  old, ref, adv, mask = (np.asarray(x[k], np.float64) for k in ("old", "ref", "adv", "mask"))
  z = np.einsum("btd,dv->btv", h, w) / temperature
  logp_v = z - _logsumexp(z)
  p = np.exp(logp_v)
  logp = np.take_along_axis(logp_v, tokens[..., None], -1)[..., 0]
  entropy = -(p * logp_v).sum(-1)
  keep = mask > 0
  lp, old, ref = (np.where(keep, a, 0.0) for a in (logp, old, ref))
  A = adv[:, None] * np.ones((B, T))
  rho = np.exp(lp - old)
  surrogate = np.minimum(rho * A, np.clip(rho, 1 - eps_low, 1 + eps_high) * A)
  kl = np.exp(ref - lp) - (ref - lp) - 1
  objective = np.where(keep, surrogate - beta * kl, 0.0)
  kl = np.where(keep, kl, 0.0) if beta > 0 else np.zeros_like(kl)
  # d outputs / d logp on kept tokens (the clipped branch, when active, is constant).
  clip_active = ((A > 0) & (rho > 1 + eps_high)) | ((A < 0) & (rho < 1 - eps_low))
  dkl = 1.0 - np.exp(ref - lp)
  dobj = np.where(clip_active, 0.0, rho * A) - beta * dkl
  g_logp, g_ent, g_obj, g_ratio, g_kl = (np.asarray(c, np.float64) for c in cts)
  g = g_logp + np.where(keep, g_obj * dobj + g_ratio * rho + (g_kl * dkl if beta > 0 else 0), 0.0)
  onehot = np.arange(V) == tokens[..., None]
  ez = (p * z).sum(-1, keepdims=True)
  dz = (g[..., None] * (onehot - p) - g_ent[..., None] * p * (z - ez)) / temperature
  grads = np.einsum("btv,dv->btd", dz, w), np.einsum("btd,btv->dv", h, dz)
  return [logp, entropy, objective, rho, kl], grads


@pytest.mark.parametrize("option", OPTIONS)
def test_float64_numpy(option):
  """The formula itself, independent of JAX: every implementation against float64."""
  want_terms, want_grads = numpy_terms_and_grads(
      make_inputs("float32", temperature=option[0]), cotangents(), *option)
  for impl in ("reference", "chunked", "pallas"):
    got_terms, got_grads = run(impl, "float32", option)
    for name, got, want in zip(FIELDS + ("d/dh", "d/dw"), got_terms + got_grads,
                               want_terms + list(want_grads)):
      assert_close(got, want, 1e-5, f"{impl} {name}")


def test_inputs_cover_both_clip_sides_and_masking():
  """Guards the parity tests' coverage."""
  x = make_inputs("float32", temperature=OPTIONS[1][0])
  terms, _ = numpy_terms_and_grads(x, cotangents(), *OPTIONS[1])
  rho, keep = terms[3], np.asarray(x["mask"]) > 0
  A = np.asarray(x["adv"])[:, None] * np.ones((B, T))
  assert np.any(keep & (A > 0) & (rho > 1.28)) and np.any(keep & (A < 0) & (rho < 0.8))
  assert np.any(keep & (rho > 0.8) & (rho < 1.2)) and np.any(~keep)


# Every aggregation; the truncation mask on one of them.
LOSSES = [GRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_aggregation=agg,
                   max_completion_length=T, mask_truncated=agg == "seq_mean_token_mean")
          for agg in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")]


@functools.lru_cache(maxsize=None)
def grpo_losses(impl):
  """[(loss, metrics, (d/dh, d/dw))] of every LOSSES entry, in one jitted program.

  impl None: GRPOLoss on log-probs of the full logits (the path the kernel replaces).
  """
  x = make_inputs("float32", temperature=0.7)
  truncated = jnp.array([False, True, False])

  def one(loss, h, w):
    if impl is None:
      logp = token_logprobs(jnp.einsum("btd,dv->btv", h, w), x["tokens"], 0.7)
      return loss.apply({}, logp, x["old"], x["ref"], x["adv"], x["mask"], truncated)
    return loss.apply({}, h, w, x["tokens"], x["old"], x["ref"], x["adv"], x["mask"], truncated,
                      temperature=0.7, impl=impl, method=GRPOLoss.from_hidden)

  @jax.jit
  def all_losses(h, w):
    return [jax.value_and_grad(functools.partial(one, loss), argnums=(0, 1), has_aux=True)(h, w)
            for loss in LOSSES]

  return jax.device_get(all_losses(x["h"], x["w"]))


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_grpo_loss_from_hidden_matches_logits_path(impl):
  """GRPOLoss.from_hidden equals GRPOLoss on reference log-probs, for every aggregation."""
  for loss, ((got, got_m), got_g), ((want, want_m), want_g) in zip(
      LOSSES, grpo_losses(impl), grpo_losses(None)):
    name = f"{impl} {loss.loss_aggregation}"
    assert_close(np.float64(got), np.float64(want), 1e-5, f"{name} loss")
    for k in want_m:
      np.testing.assert_allclose(float(got_m[k]), float(want_m[k]), rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} {k}")
    assert float(got_m["entropy"]) > 0
    for part, g, wg in zip(("d/dh", "d/dw"), got_g, want_g):
      assert_close(np.asarray(g, np.float64), np.asarray(wg, np.float64), 1e-5, f"{name} {part}")


def test_sft_cross_entropy_from_hidden_matches_logits_path():
  x = make_inputs("float32")
  weights = x["mask"]

  def logits_path(h, w):
    return masked_cross_entropy(jnp.einsum("btd,dv->btv", h, w), x["tokens"], weights)[0]

  want, want_g = jax.value_and_grad(logits_path, argnums=(0, 1))(x["h"], x["w"])
  for impl in ("chunked", "pallas"):
    f = lambda h, w: hidden_cross_entropy(h, w, x["tokens"], weights, impl=impl)[0]
    got, got_g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x["h"], x["w"])
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=impl)
    for g, wg in zip(got_g, want_g):
      assert_close(np.asarray(g, np.float64), np.asarray(wg, np.float64), 1e-5, impl)


def test_pallas_lowers_for_tpu():
  """Forward and backward lower to Mosaic (a tpu_custom_call) from this CPU host."""
  x = make_inputs("bfloat16")

  def loss(h, w):
    terms = token_logprobs_and_clip(h, w, x["tokens"], x["old"], x["adv"], x["mask"], x["ref"],
                                    beta=0.04, with_entropy=True, impl="pallas", interpret=False,
                                    block_t=64, block_v=256)
    return jnp.sum(terms.objective) + jnp.sum(terms.entropy)

  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=["tpu"])(
      spec(x["h"]), spec(x["w"]))
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") == 3, "expected the forward, dh and dW kernels"


def test_switch_and_tile_validation():
  single_tpu = jax.default_backend() == "tpu" and jax.device_count() == 1
  assert resolve_impl("auto") == ("pallas" if single_tpu else "chunked")
  assert impl_from_config(ml_collections.ConfigDict()) == "auto"
  assert impl_from_config(ml_collections.ConfigDict({"loss": {"impl": "chunked"}})) == "chunked"
  with pytest.raises(ValueError, match="loss.impl"):
    impl_from_config(ml_collections.ConfigDict({"loss": {"impl": "fast"}}))
  x = make_inputs("float32")
  with pytest.raises(ValueError, match="block_v=100 must be a multiple of 128"):
    token_logprobs_and_clip(x["h"], x["w"], x["tokens"], impl="pallas", block_v=100)
  with pytest.raises(ValueError, match="go together"):
    token_logprobs_and_clip(x["h"], x["w"], x["tokens"], x["old"], impl="chunked")

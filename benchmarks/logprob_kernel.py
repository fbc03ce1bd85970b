"""Fused log-prob kernel: compiled temporary memory, wall time and error per implementation.

  python benchmarks/logprob_kernel.py [--dtype float32] [--run-limit 3e10] [--lowering]

For each shape (tiny world up to a Qwen2.5-1.5B mini-batch of B·T = 32768
tokens, V = 152064, D = 1536) and each implementation of
`r1jax.kernels.token_logprobs_and_clip`, the program benchmarked is one GRPO
training use: value and gradient (w.r.t. hidden states and the output
projection) of the token-mean clipped objective with a KL term and entropy.
Columns:
  temp       compiled temporary memory, from `jit(...).lower(...).compile()
             .memory_analysis()` on abstract inputs (nothing allocated, nothing run);
  ms         wall time on this backend after a warm-up call — only for shapes
             with B·T·V·D <= --run-limit (on CPU the small ones; Pallas runs in
             interpret mode off TPU, so its time there means nothing);
  max err    max |x - reference| / max |reference| over the loss and both gradients.
`--lowering` also says for which platforms the Pallas kernel lowers (jax.export).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.kernels import token_logprobs_and_clip

IMPLS = ("reference", "chunked", "pallas")
# (name, B, T, V, D)
SHAPES = [
    ("tiny world", 16, 160, 640, 128),
    ("small", 8, 256, 8192, 256),
    ("medium", 8, 1024, 32768, 512),
    ("qwen2.5-1.5b", 8, 4096, 152064, 1536),
]


def grpo_loss_fn(impl: str, **kernel_kw):
  """(h, w, tokens, old, adv, mask, ref) -> (loss, (d/dh, d/dw)), as a GRPO step uses it."""

  def loss(h, w, tokens, old, adv, mask, ref):
    t = token_logprobs_and_clip(h, w, tokens, old, adv, mask, ref, temperature=0.9, beta=0.04,
                                epsilon_high=0.28, with_entropy=True, impl=impl, **kernel_kw)
    return -jnp.sum(t.objective) / jnp.maximum(jnp.sum(mask), 1.0) + 0.0 * jnp.sum(t.entropy)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def abstract_inputs(B, T, V, D, dtype):
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return (jax.ShapeDtypeStruct((B, T, D), dtype), jax.ShapeDtypeStruct((D, V), dtype),
          jax.ShapeDtypeStruct((B, T), jnp.int32), f32(B, T), f32(B), f32(B, T), f32(B, T))


def concrete_inputs(B, T, V, D, dtype, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
  w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), dtype)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  old = jnp.asarray(-np.log(V) + rng.uniform(-0.5, 0.5, (B, T)), jnp.float32)
  adv = jnp.asarray(rng.normal(size=B), jnp.float32)
  mask = jnp.asarray(rng.random((B, T)) < 0.9, jnp.float32)
  return h, w, tokens, old, adv, mask, old + 0.1


def max_error(got, want) -> float:
  leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) /
                jnp.max(jnp.abs(r.astype(jnp.float32)))) for g, r in leaves]
  return max(errs) if all(np.isfinite(errs)) else float("nan")


def lowering_report():
  """Which platforms the Pallas forward + backward lower for (no device needed)."""
  B, T, V, D = 2, 256, 1000, 128
  fn = grpo_loss_fn("pallas", interpret=False)
  for platform in ("tpu", "cuda"):
    try:
      exported = jax.export.export(fn, platforms=[platform])(
          *abstract_inputs(B, T, V, D, jnp.bfloat16))
      kernels = exported.mlir_module().count("tpu_custom_call")
      print(f"pallas lowers for {platform}: yes ({kernels} tpu_custom_call kernels)")
    except Exception as e:  # report, do not stop: this is the finding
      reason = str(e).splitlines()[0][:150]
      print(f"pallas lowers for {platform}: no ({type(e).__name__}: {reason})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--run-limit", type=float, default=3e10, help="max B·T·V·D to execute")
  parser.add_argument("--lowering", action="store_true")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  print(f"backend: {jax.default_backend()} x {jax.device_count()}, inputs {args.dtype}, "
        f"value+grad of the GRPO objective")
  print(f"{'shape':<14}{'B·T':>7}{'V':>8}{'D':>6}  {'impl':<16}{'temp':>11}{'vs ref':>8}"
        f"{'ms':>10}{'max err':>10}{'compile s':>11}")
  for name, B, T, V, D in SHAPES:
    run = B * T * V * D <= args.run_limit
    inputs = concrete_inputs(B, T, V, D, dtype) if run else None
    ref_temp, ref_out = None, None
    for impl in IMPLS:
      fn = grpo_loss_fn(impl)
      t0 = time.perf_counter()
      compiled = fn.lower(*abstract_inputs(B, T, V, D, dtype)).compile()
      t_compile = time.perf_counter() - t0
      temp = compiled.memory_analysis().temp_size_in_bytes
      ref_temp = ref_temp or temp
      ms = err = "-"
      if run:
        out = jax.block_until_ready(compiled(*inputs))
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*inputs))
        ms = f"{1e3 * (time.perf_counter() - t0):.1f}"
        ref_out = ref_out or out
        err = f"{max_error(out, ref_out):.1e}"
      label = impl + (" (interp)" if impl == "pallas" and jax.default_backend() != "tpu" else "")
      print(f"{name:<14}{B * T:>7}{V:>8}{D:>6}  {label:<16}{temp / 2**20:>9.1f}Mi"
            f"{temp / ref_temp:>8.1%}{ms:>10}{err:>10}{t_compile:>11.1f}", flush=True)
  if args.lowering:
    lowering_report()


if __name__ == "__main__":
  main()

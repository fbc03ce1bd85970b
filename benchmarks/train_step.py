"""Tiny-preset train-step throughput on this machine (forward + backward).

  python benchmarks/train_step.py [--batch 16] [--seq 256] [--steps 5]

Prints a table: ms per step, tokens/s and achieved GFLOP/s (6 x params x
tokens for the matmuls plus 12 x layers x T x D per token for attention), next
to a same-process float32 matmul rate as the machine's reference.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.losses.sft import masked_cross_entropy
from r1jax.models.config import get_preset
from r1jax.models.transformer import Transformer, count_params


def _time(fn, *args, steps):
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / steps


def matmul_gflops(n=1024, steps=5):
  a = jnp.ones((n, n), jnp.float32)
  return 2 * n ** 3 / _time(jax.jit(lambda a: a @ a), a, steps=steps) / 1e9


def train_step_row(batch, seq, steps):
  c = get_preset("tiny")
  model = Transformer(c)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 4, c.vocab_size)

  def loss(p):
    logits, _ = model.apply({"params": p}, tokens)
    return masked_cross_entropy(logits, tokens, jnp.ones(tokens.shape))[0]

  dt = _time(jax.jit(jax.value_and_grad(loss)), params, steps=steps)
  n_tok = batch * seq
  flops = 6 * count_params(params) * n_tok + 12 * c.num_hidden_layers * seq * c.hidden_size * n_tok
  return dict(batch=batch, seq=seq, ms=dt * 1e3, tok_s=n_tok / dt, gflops=flops / dt / 1e9)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, nargs="+", default=[8, 16])
  ap.add_argument("--seq", type=int, nargs="+", default=[128, 256])
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  ref = matmul_gflops()
  print(f"device: {jax.devices()[0].device_kind}  float32 1024^3 matmul: {ref:.1f} GFLOP/s\n")
  print(f"{'batch':>5} {'seq':>5} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'of matmul':>9}")
  for b in args.batch:
    for t in args.seq:
      r = train_step_row(b, t, args.steps)
      print(f"{b:>5} {t:>5} {r['ms']:>9.0f} {r['tok_s']:>10.0f} {r['gflops']:>8.1f} "
            f"{r['gflops'] / ref:>9.0%}")


if __name__ == "__main__":
  main()

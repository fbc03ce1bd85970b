"""The machine's achievable matmul rate for a model's own shapes, and a workload's FLOP floor.

  python benchmarks/roofline.py [--rows 128] [--tokens 3072]

Measured in the process that runs the workload (benchmarks/sampler.py and
benchmarks/grpo_step.py import this), so "fraction of the roofline" compares
like with like. For a dense decoder (r1jax.models.config.ModelConfig):

- `model_matmuls(config)`: every weight matmul of one token's forward pass as
  (name, K, N, count): q/k/v/o, gate/up/down per layer, the output head.
- `measure_rates(config, rows)`: the best jitted float32 (and bf16 where the
  backend has fast bf16) `[rows, K] x [K, N]` rate for each distinct (K, N),
  with `rows` = the decode batch (B*G) or the training tokens.
- `measure_bandwidth()`: the best jitted read rate of a 256 MiB float32 array.
- `floor_seconds(config, rows, contexts, rates)`: the weight-matmul FLOPs of
  `rows` tokens at each of `contexts` positions divided by those rates, plus
  attention over the real context (not the padded cache) at the larger of its
  FLOPs at the best matmul rate and its KV-cache bytes at the measured
  bandwidth (decode attention reads the cache once per token: memory-bound;
  a prompt shared by G samples counts once): no implementation of that
  forward pass can take less on this machine.
- `decode_floor`, `prefill_floor`, `train_floor`: the sampler's and the GRPO
  update's floors (a training token costs its forward + 2x in the backward).

Prints, for the bench config of issue 10, the rate per shape and the floors.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.models.config import ModelConfig

# Issue 10's bench config: Qwen2-shaped dense, hidden 256, 4 layers, 4 query /
# 2 kv heads, ffn 1024, vocab 1024, tied embeddings; 16 prompts x G=8,
# prompt 64 tokens, 128 new tokens, float32.
BENCH = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, qkv_bias=True, tie_word_embeddings=True)
BENCH_SHAPE = dict(prompts=16, group=8, prompt_len=64, new_tokens=128)


def model_matmuls(c: ModelConfig) -> list[tuple[str, int, int, int]]:
  """(name, K, N, count per token) of every weight matmul in one token's forward."""
  D, F, H = c.hidden_size, c.intermediate_size, c.head_size
  L = c.num_hidden_layers
  return [("q_proj", D, c.num_attention_heads * H, L), ("k_proj", D, c.num_key_value_heads * H, L),
          ("v_proj", D, c.num_key_value_heads * H, L), ("o_proj", c.num_attention_heads * H, D, L),
          ("gate_proj", D, F, L), ("up_proj", D, F, L), ("down_proj", F, D, L),
          ("lm_head", D, c.vocab_size, 1)]


def matmul_rate(rows: int, k: int, n: int, dtype=jnp.float32, min_seconds: float = 0.3) -> float:
  """Best achieved FLOP/s of a jitted [rows, k] x [k, n] matmul (a chain of 8
  per call, so dispatch is amortised)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
  w = jnp.asarray(rng.standard_normal((8, k, n)) / np.sqrt(k), dtype)

  @jax.jit
  def chain(x, w):
    return jnp.stack([x @ w[i] for i in range(8)]).sum(0)

  jax.block_until_ready(chain(x, w))
  best, spent = float("inf"), 0.0
  while spent < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(chain(x, w))
    dt = time.perf_counter() - t0
    best, spent = min(best, dt), spent + dt
  return 8 * 2.0 * rows * k * n / best


def measure_bandwidth(mib: int = 256, min_seconds: float = 0.3) -> float:
  """Best achieved bytes/s of a jitted full read (a sum) of a `mib` MiB array."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  jax.block_until_ready(f(x))
  best, spent = float("inf"), 0.0
  while spent < min_seconds:
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    dt = time.perf_counter() - t0
    best, spent = min(best, dt), spent + dt
  return x.nbytes / best


_BANDWIDTH: list = []


def measure_rates(c: ModelConfig, rows: int, dtype=jnp.float32) -> dict:
  """FLOP/s per distinct (K, N) weight shape of the model at `rows` rows, and
  under "attention" the best of them (attention's FLOPs, batched [1, H] x
  [H, ctx] products, go no faster) and under "bandwidth" bytes/s."""
  shapes = sorted({(k, n) for _, k, n, _ in model_matmuls(c)})
  rates = {(k, n): matmul_rate(rows, k, n, dtype) for k, n in shapes}
  rates["attention"] = max(rates.values())
  if not _BANDWIDTH:
    _BANDWIDTH.append(measure_bandwidth())
  rates["bandwidth"] = _BANDWIDTH[0]
  return rates


def forward_flops(c: ModelConfig, contexts: Sequence[int]) -> tuple[float, float]:
  """(weight-matmul FLOPs, attention FLOPs) of one row's tokens at `contexts`
  positions (context = tokens attended to, itself included)."""
  weights = sum(2.0 * k * n * cnt for _, k, n, cnt in model_matmuls(c)) * len(contexts)
  attn = 4.0 * c.num_hidden_layers * c.num_attention_heads * c.head_size * float(sum(contexts))
  return weights, attn


def floor_seconds(c: ModelConfig, rows: int, contexts: Sequence[int],
                  rates: dict, *, shared: int = 0, group: int = 1) -> float:
  """Seconds for `rows` rows' forward at each of `contexts` at the measured
  rates (`shared`, `group`: as in attention_seconds)."""
  t = 0.0
  for _, k, n, cnt in model_matmuls(c):
    t += 2.0 * k * n * cnt * rows * len(contexts) / rates[(k, n)]
  return t + attention_seconds(c, rows, contexts, rates, shared=shared, group=group)


def attention_seconds(c: ModelConfig, rows: int, contexts: Sequence[int], rates, *,
                      shared: int = 0, group: int = 1) -> float:
  """Attention of `rows` rows' tokens at `contexts`: FLOPs at the best matmul
  rate or, when more, the keys and values read at the bandwidth. The first
  `shared` slots of every context hold the same keys for each `group` of
  consecutive rows (G samples of one prompt), so they are read once per group."""
  _, flops = forward_flops(c, contexts)
  slot_bytes = 2.0 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * 4
  slots = rows * (sum(contexts) - shared * len(contexts)) + rows / group * shared * len(contexts)
  return max(rows * flops / rates["attention"], slot_bytes * slots / rates["bandwidth"])


def decode_floor(c: ModelConfig, rows: int, prompt_len: int, new_tokens: int, rates, *,
                 group: int = 1) -> float:
  """Decoding `new_tokens` for `rows` rows after a `prompt_len` prompt (the
  first new token comes from the prefill's last position, the rest from
  new_tokens - 1 decode steps); `group` rows share each prompt's keys and
  values (1: every row has its own copy)."""
  return floor_seconds(c, rows, range(prompt_len + 1, prompt_len + new_tokens), rates,
                       shared=prompt_len, group=group)


def prefill_floor(c: ModelConfig, prompts: int, prompt_len: int, rates) -> float:
  """Prefilling `prompts` prompts once each (the head only at the last position)."""
  no_head = [m for m in model_matmuls(c) if m[0] != "lm_head"]
  t = sum(2.0 * k * n * cnt * prompts * prompt_len / rates[(k, n)] for _, k, n, cnt in no_head)
  _, k, n, _ = model_matmuls(c)[-1]
  t += 2.0 * k * n * prompts / rates[(k, n)]
  _, attn = forward_flops(c, range(1, prompt_len + 1))  # prefill attention: compute-bound
  return t + attn * prompts / rates["attention"]


def train_flops(c: ModelConfig, rows: int, seq_len: int) -> float:
  """Model FLOPs of an update on `rows` sequences of `seq_len`: 3x the forward
  (the backward is 2x), rematerialised work not counted (as MFU counts)."""
  weights, attn = forward_flops(c, range(1, seq_len + 1))
  return 3.0 * rows * (weights + attn)


def train_floor(c: ModelConfig, rows: int, seq_len: int, rates) -> float:
  """Forward + backward (2x the forward's matmuls) of `rows` sequences of `seq_len`."""
  return 3.0 * floor_seconds(c, rows, range(1, seq_len + 1), rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=BENCH_SHAPE["prompts"] * BENCH_SHAPE["group"],
                      help="decode rows (B*G)")
  parser.add_argument("--tokens", type=int, default=2048, help="training-shaped rows (tokens)")
  args = parser.parse_args()
  c, s = BENCH, BENCH_SHAPE
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  print(f"{'shape':<22}{'decode GFLOP/s':>16}{'training GFLOP/s':>18}")
  dec, trn = measure_rates(c, args.rows), measure_rates(c, args.tokens)
  for key in dec:
    if not isinstance(key, tuple):
      continue
    name = f"[.,{key[0]}]x[{key[0]},{key[1]}]"
    print(f"{name:<22}{dec[key] / 1e9:>16.1f}{trn[key] / 1e9:>18.1f}")
  rows = s["prompts"] * s["group"]
  d = decode_floor(c, rows, s["prompt_len"], s["new_tokens"], dec, group=s["group"])
  p = prefill_floor(c, s["prompts"], s["prompt_len"], trn)
  t = train_floor(c, rows, s["prompt_len"] + s["new_tokens"], trn)
  print(f"read bandwidth: {dec['bandwidth'] / 1e9:.1f} GB/s")
  print(f"bench floors: prefill {p * 1e3:.1f} ms, decode {d * 1e3:.1f} ms "
        f"({rows * s['new_tokens'] / (d + p):.0f} tok/s), GRPO update {t * 1e3:.1f} ms")


if __name__ == "__main__":
  main()

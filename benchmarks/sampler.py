"""Sampler throughput as a fraction of this machine's roofline, measured in the same run.

  python benchmarks/sampler.py [--repeats 3] [--skip-vocab]

Rows of the table (random-init models, random prompt tokens; the loop runs
all max_new_tokens steps (asserted), so tok/s = rows x max_new_tokens / time;
timings exclude compilation, best of --repeats):

- `bench`: issue 10's bench config (benchmarks/roofline.py: BENCH), 16 prompts
  x G=8, prompt 64, 128 new tokens, temperature 1.0, float32.
- `bench, unshared prefill`: the same with every copy prefilled
  (SamplingConfig.share_prefix=False, what the PyTorch anchors do).
- `tiny`: the tiny world's preset at its R1-Zero shape (16 x 8, prompt 32, 64 new).

floor = prefill floor + decode floor at the matmul rates measured just before
(roofline.py; with a shared prefill the prompt's keys count once per prompt,
as the sampler reads them); fraction = floor / measured time. Then the top-p truncation of
one decode step at a 151,936-token vocabulary: sorting vs the sort-free search.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import mfu
import roofline
from r1jax.models.config import get_preset
from r1jax.models.transformer import Transformer
from r1jax.sampling.sampler import SamplingConfig, _sample, truncate_logits


def time_sampler(config, prompts, group, prompt_len, new_tokens, repeats, share_prefix=True):
  model = Transformer(config)
  params = mfu.random_params(model)
  rng = np.random.default_rng(0)
  batch = [rng.integers(1, config.vocab_size, prompt_len).tolist() for _ in range(prompts)]
  # A few rows may draw eos (the last id) early; the loop runs while any row
  # is unfinished, so its work is rows x steps run either way.
  eos = config.vocab_size - 1
  sc = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, num_samples=group,
                      prompt_bucket=prompt_len, share_prefix=share_prefix)
  run = lambda i: jax.block_until_ready(_sample(model, params, batch, jax.random.key(i), sc,
                                                eos_id=eos, pad_id=0, max_cache_length=None))
  run(0)  # compile
  best = float("inf")
  for i in range(repeats):
    t0 = time.perf_counter()
    out, steps = run(i + 1)
    best = min(best, time.perf_counter() - t0)
  assert int(steps) == new_tokens, int(steps)  # no early exit: compare like with like
  return best, int(np.asarray(out.lengths).sum())


def truncation_times(vocab=151936, rows=128, repeats=5):
  x = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32) * 3
  out = {}
  for method in ("sort", "search"):
    f = jax.jit(lambda x, k, p, method=method: truncate_logits(x, k, p, method=method))
    jax.block_until_ready(f(x, 0, 0.95))
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, 0, 0.95))
      best = min(best, time.perf_counter() - t0)
    out[method] = best
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-vocab", action="store_true", help="skip the 151,936-vocab timing")
  args = parser.parse_args()
  s = roofline.BENCH_SHAPE
  tiny = dataclasses.replace(get_preset("tiny"), max_position_embeddings=512)
  cases = [("bench", roofline.BENCH, s["prompts"], s["group"], s["prompt_len"], s["new_tokens"], True),
           ("bench, unshared prefill", roofline.BENCH, s["prompts"], s["group"], s["prompt_len"],
            s["new_tokens"], False),
           ("tiny", tiny, 16, 8, 32, 64, True)]
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}")
  print(f"{'case':<26}{'rows':>5}{'new':>5}{'tok/s':>9}{'measured s':>12}{'floor s':>9}"
        f"{'of roofline':>13}{'decode GFLOP/s':>16}")
  for name, config, B, G, P, N, share in cases:
    rates_dec = roofline.measure_rates(config, B * G)
    rates_pre = roofline.measure_rates(config, B * P if share else B * G * P)
    floor = (roofline.prefill_floor(config, B if share else B * G, P, rates_pre)
             + roofline.decode_floor(config, B * G, P, N, rates_dec, group=G if share else 1))
    t, generated = time_sampler(config, B, G, P, N, args.repeats, share_prefix=share)
    w, a = roofline.forward_flops(config, range(P + 1, P + N))
    achieved = (w + a) * B * G / t
    print(f"{name:<26}{B * G:>5}{N:>5}{B * G * N / t:>9.0f}{t:>12.3f}{floor:>9.3f}"
          f"{floor / t:>13.0%}{achieved / 1e9:>16.1f}")
  if not args.skip_vocab:
    tt = truncation_times()
    print(f"top-p 0.95 over 128 x 151,936 logits: sort {tt['sort'] * 1e3:.0f} ms, "
          f"sort-free search {tt['search'] * 1e3:.0f} ms")


if __name__ == "__main__":
  main()

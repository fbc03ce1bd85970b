"""GRPO step anatomy: sampling vs training throughput and their share of a step.

  python benchmarks/grpo_step.py [--presets tiny qwen2.5-math-1.5b] [--steps 2]

For each preset: a random-init model samples G completions for B prompts
(random prompt tokens; the last vocabulary id stands in for EOS, so rows
rarely stop early), then one jitted GRPO update runs on the
rollout. Timings exclude compilation (one warm-up step first). Prints a table:
rows, completion tokens, sampling tokens/s (generated tokens), training
tokens/s (prompt + completion tokens through forward + backward), and the
share of the step spent in each.

`qwen2.5-math-1.5b` keeps the preset's widths and 151,936-token vocabulary
but only `--mid-layers` of its 28 layers, so that it runs on a CPU; on an
accelerator pass `--mid-layers 28`.
"""

import argparse
import dataclasses
import functools
import time

import jax
import numpy as np
import optax

from r1jax.losses.grpo import GRPOLoss
from r1jax.models.config import ModelConfig, get_preset
from r1jax.models.transformer import Transformer, count_params
from r1jax.parallel.mesh import batch_sharding, make_mesh, mesh_rules
from r1jax.sampling.sampler import SamplingConfig, sample
from r1jax.trainers import grpo
from r1jax.trainers.sft import jit_train_step
from r1jax.trainers.state import create_train_state

# (prompts B, samples G, prompt tokens, max new tokens) per preset: the tiny
# preset's own R1-Zero shape; a small rollout for the mid-size model on CPU.
SHAPES = {"tiny": (16, 8, 96, 96), "qwen2.5-math-1.5b": (2, 4, 64, 64)}


def bench(name: str, steps: int, mid_layers: int) -> dict:
  cfg = get_preset(name)
  if name != "tiny":
    cfg = dataclasses.replace(cfg, num_hidden_layers=mid_layers)
  B, G, P, N = SHAPES[name]
  model = Transformer(cfg)
  mesh = make_mesh({"data": -1})
  tx = optax.adamw(1e-5)
  state, shardings = create_train_state(model, tx, mesh, seed=0)
  rng = np.random.default_rng(0)
  sc = SamplingConfig(max_new_tokens=N, temperature=1.0, num_samples=G)
  step_fn = functools.partial(grpo.grpo_train_step, model=model, loss=GRPOLoss(beta=0.0),
                              tx=tx, temperature=1.0)
  t_sample = t_train = gen_tokens = train_tokens = 0.0
  with mesh_rules(mesh):
    jitted = jit_train_step(step_fn, shardings, mesh)
    for i in range(steps + 1):  # step 0 compiles
      prompts = [rng.integers(4, cfg.vocab_size, P).tolist() for _ in range(B)]
      t0 = time.perf_counter()
      out = jax.device_get(sample(model, state.params, prompts, jax.random.key(i), sc,
                                  eos_id=cfg.vocab_size - 1, pad_id=0))
      t1 = time.perf_counter()
      lengths = np.asarray(out.lengths)
      adv = rng.standard_normal(B * G).astype(np.float32)
      host = grpo.build_batch(prompts, G, np.asarray(out.tokens), np.asarray(out.logprobs),
                              lengths, np.asarray(out.finished), adv, pad_id=0)
      t2 = time.perf_counter()
      state, m = jitted(state, jax.device_put(host, batch_sharding(mesh)))
      jax.block_until_ready(m["loss"])
      t3 = time.perf_counter()
      if i:
        t_sample += t1 - t0
        t_train += t3 - t2
        gen_tokens += float(lengths.sum())
        train_tokens += float(host["segment_ids"].sum())
  total = t_sample + t_train
  return dict(preset=name, layers=cfg.num_hidden_layers, params=count_params(state.params),
              rows=B * G, new_tokens=N, sample_tps=gen_tokens / t_sample,
              train_tps=train_tokens / t_train, sample_share=t_sample / total,
              train_share=t_train / total, step_s=total / steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--mid-layers", type=int, default=2)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].platform} x {jax.device_count()}")
  print(f"{'preset':<20}{'layers':>7}{'params':>12}{'rows':>6}{'new':>5}{'sample tok/s':>14}"
        f"{'train tok/s':>13}{'sampling':>10}{'training':>10}{'s/step':>8}")
  for name in args.presets:
    r = bench(name, args.steps, args.mid_layers)
    print(f"{r['preset']:<20}{r['layers']:>7}{r['params']:>12,}{r['rows']:>6}{r['new_tokens']:>5}"
          f"{r['sample_tps']:>14.0f}{r['train_tps']:>13.0f}{r['sample_share']:>10.0%}"
          f"{r['train_share']:>10.0%}{r['step_s']:>8.2f}")


if __name__ == "__main__":
  main()

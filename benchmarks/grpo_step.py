"""GRPO step anatomy and its distance from the FLOP floor, measured in the same run.

  python benchmarks/grpo_step.py [--presets bench tiny qwen2.5-math-1.5b] [--steps 2]
      [--mid-layers 2] [--shape B G P N] [--dtype float32] [--micro-batches 1]
      [--attention xla] [--decode-segments 4]

`bench` is issue 10's bench config (benchmarks/roofline.py): 16 prompts x G=8,
prompt 64, 128 new tokens, float32, beta 0 and mu 1 (so the update needs no
extra log-prob pass: the sampler's log-probs are pi_old). The step = rollout
+ rewards (the rule rewards, in process, on the completions rendered as
token-id text: a stand-in with the same per-row cost) + update. Its floor =
prefill + decode + forward/backward FLOPs at the matmul rates measured in the
same process (roofline.py); "x floor" = measured / floor.

For each preset: a random-init model samples G completions for B prompts
(random prompt tokens; the last vocabulary id stands in for EOS, so rows
rarely stop early), then one jitted GRPO update runs on the
rollout. Timings exclude compilation (one warm-up step first). Prints a table:
rows, completion tokens, sampling tokens/s (generated tokens), training
tokens/s (prompt + completion tokens through forward + backward), and the
share of the step spent in each. Each phase's time (compilation included, on
step 0) goes to stderr as it ends.

`qwen2.5-math-1.5b` keeps the preset's widths and 151,936-token vocabulary
but only `--mid-layers` of its 28 layers, so that it runs on a CPU; on an
accelerator pass `--mid-layers 28` (and e.g. `--dtype bfloat16 --shape 8 8
128 383 --micro-batches 2 --attention cudnn`). Where the device's datasheet
peak is known (benchmarks/mfu.py: PEAK), the update's MFU is printed too:
its model FLOPs (3x the forward's) over its time and that peak.
"""

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mfu
import roofline

from r1jax.losses.grpo import GRPOLoss
from r1jax.models.config import get_preset
from r1jax.models.transformer import Transformer, count_params
from r1jax.parallel.mesh import batch_sharding, make_mesh, mesh_rules
from r1jax.rewards import RewardRunner, accuracy_reward_fn, format_reward_fn
from r1jax.sampling.sampler import SamplingConfig, sample
from r1jax.trainers import grpo
from r1jax.trainers.sft import jit_train_step
from r1jax.trainers.state import create_train_state

# (prompts B, samples G, prompt tokens, max new tokens) per preset: the tiny
# preset's own R1-Zero shape; a small rollout for the mid-size model on CPU.
SHAPES = {"bench": (16, 8, 64, 128), "tiny": (16, 8, 96, 96), "qwen2.5-math-1.5b": (2, 4, 64, 64)}


def log(name: str, text: str):
  """Progress on stderr as each phase ends, so a run cut off by a time limit
  still says where its time went (the table goes to stdout)."""
  print(f"[{name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def bench(name: str, steps: int, mid_layers: int, shape=None, dtype: str = "float32",
          micro_batches: int = 1, attention: str = "xla", decode_segments: int = 4) -> dict:
  cfg = roofline.BENCH if name == "bench" else get_preset(name)
  if name not in ("tiny", "bench"):
    cfg = dataclasses.replace(cfg, num_hidden_layers=mid_layers)
  B, G, P, N = shape or SHAPES[name]
  cfg = cfg.replace(dtype=dtype, attention_impl=attention,
                    max_position_embeddings=max(cfg.max_position_embeddings, P + N + 32))
  mm_dtype = jnp.dtype(dtype)
  model = Transformer(cfg)
  mesh = make_mesh({"data": -1})
  tx = optax.adamw(1e-5)
  t_build = time.perf_counter()
  state, shardings = create_train_state(model, tx, mesh, seed=0,
                                        init_params=mfu.random_params(model, mesh))
  jax.block_until_ready(state)
  log(name, f"{cfg.num_hidden_layers} layers, {B}x{G} rows, prompt {P}, {N} new: params and "
            f"optimizer state in {time.perf_counter() - t_build:.1f} s")
  rng = np.random.default_rng(0)
  sc = SamplingConfig(max_new_tokens=N, temperature=1.0, num_samples=G, prompt_bucket=32,
                      decode_segments=decode_segments)
  step_fn = functools.partial(grpo.grpo_train_step, model=model, loss=GRPOLoss(beta=0.0),
                              tx=tx, temperature=1.0, micro_batches=micro_batches)
  runner = RewardRunner({"accuracy": (accuracy_reward_fn, 1.0), "format": (format_reward_fn, 1.0)},
                        workers=0)
  # Floors at this process's measured matmul rates (decode rows; training tokens).
  rows, seq = B * G, P + N
  rates_dec = roofline.measure_rates(cfg, rows, mm_dtype)
  rates_trn = roofline.measure_rates(cfg, rows * seq, mm_dtype)
  floor_roll = (roofline.prefill_floor(cfg, B, P, roofline.measure_rates(cfg, B * P, mm_dtype))
                + roofline.decode_floor(cfg, rows, P, N, rates_dec, group=G))
  floor_train = roofline.train_floor(cfg, rows, seq, rates_trn)
  log(name, f"matmul rates measured; floors: rollout {floor_roll:.3f} s, update {floor_train:.3f} s")
  t_sample = t_reward = t_train = gen_tokens = train_tokens = train_flops = 0.0
  with mesh_rules(mesh):
    jitted = jit_train_step(step_fn, shardings, mesh)
    for i in range(steps + 1):  # step 0 compiles
      prompts = [rng.integers(4, cfg.vocab_size - 1, P).tolist() for _ in range(B)]
      t0 = time.perf_counter()
      out = jax.device_get(sample(model, state.params, prompts, jax.random.key(i), sc,
                                  eos_id=cfg.vocab_size - 1, pad_id=0))
      t1 = time.perf_counter()
      lengths = np.asarray(out.lengths)
      texts = [" ".join(map(str, t[:n])) for t, n in zip(out.tokens, lengths)]
      total, _, _ = runner.score([""] * len(texts), texts, ["7"] * len(texts))
      adv = np.asarray(grpo.group_advantages(jnp.asarray(
          total.reshape(B, G) + rng.standard_normal((B, G)).astype(np.float32)))).reshape(-1)
      t2 = time.perf_counter()
      host = grpo.build_batch(prompts, G, np.asarray(out.tokens), np.asarray(out.logprobs),
                              lengths, np.asarray(out.finished), adv, pad_id=0)
      state, m = jitted(state, jax.device_put(host, batch_sharding(mesh)))
      jax.block_until_ready(m["loss"])
      t3 = time.perf_counter()
      log(name, f"step {i}{' (compiles)' if i == 0 else ''}: rollout {t1 - t0:.2f} s, "
                f"rewards {t2 - t1:.2f} s, update {t3 - t2:.2f} s")
      if i:
        t_sample += t1 - t0
        t_reward += t2 - t1
        t_train += t3 - t2
        gen_tokens += float(lengths.sum())
        train_tokens += float(host["segment_ids"].sum())
        # The padded rows the update computes.
        train_flops += roofline.train_flops(cfg, rows, host["tokens"].shape[1])
  runner.close()
  total_s = (t_sample + t_reward + t_train) / steps
  # Tokens actually generated may fall short of N (eos drawn): scale the floors.
  fill = gen_tokens / (steps * rows * N)
  floor = (floor_roll + floor_train) * fill
  peak = mfu.peak_flops(jax.devices()[0].device_kind, dtype)
  return dict(preset=name, layers=cfg.num_hidden_layers, params=count_params(state.params),
              rows=rows, new_tokens=N, sample_tps=gen_tokens / t_sample,
              train_tps=train_tokens / t_train, sample_s=t_sample / steps,
              reward_s=t_reward / steps, train_s=t_train / steps, step_s=total_s,
              floor_sample_s=floor_roll * fill, floor_train_s=floor_train * fill, floor_s=floor,
              x_floor=total_s / floor, train_tflops=train_flops / t_train / 1e12,
              train_mfu=train_flops / t_train / peak if peak else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", nargs="+", default=["bench", "tiny"], choices=list(SHAPES))
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--mid-layers", type=int, default=2)
  parser.add_argument("--shape", type=int, nargs=4, metavar=("B", "G", "P", "N"),
                      help="prompts, samples per prompt, prompt and new tokens (all presets)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--micro-batches", type=int, default=1)
  parser.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
  parser.add_argument("--decode-segments", type=int, default=4,
                      help="SamplingConfig.decode_segments (each segment compiles its own loop)")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}, {args.dtype}")
  print(f"{'preset':<20}{'layers':>7}{'params':>15}{'rows':>6}{'new':>5}{'sample tok/s':>14}"
        f"{'train tok/s':>13}{'sample s':>10}{'reward s':>10}{'update s':>10}{'step s':>8}"
        f"{'floor s':>9}{'x floor':>9}")
  for name in args.presets:
    r = bench(name, args.steps, args.mid_layers, args.shape, args.dtype, args.micro_batches,
              args.attention, args.decode_segments)
    print(f"{r['preset']:<20}{r['layers']:>7}{r['params']:>15,}{r['rows']:>6}{r['new_tokens']:>5}"
          f"{r['sample_tps']:>14.0f}{r['train_tps']:>13.0f}{r['sample_s']:>10.2f}"
          f"{r['reward_s']:>10.2f}{r['train_s']:>10.2f}{r['step_s']:>8.2f}{r['floor_s']:>9.2f}"
          f"{r['x_floor']:>9.2f}")
    print(f"{'':<20}floors: rollout {r['floor_sample_s']:.2f} s (measured {r['sample_s']:.2f}), "
          f"update {r['floor_train_s']:.2f} s (measured {r['train_s']:.2f})")
    mfu_text = f", MFU {r['train_mfu']:.1%}" if r["train_mfu"] is not None else ""
    print(f"{'':<20}update: {r['train_tflops']:.2f} TFLOP/s of model FLOPs{mfu_text}")


if __name__ == "__main__":
  main()

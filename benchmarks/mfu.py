"""Model FLOPs utilisation (MFU) of a dense GRPO update on this machine.

  python benchmarks/mfu.py [--preset qwen2.5-math-1.5b] [--rows 16] [--seq 1024] [--steps 5]
      [--variants attention=xla attention=cudnn attention=cudnn,remat=1,rows=32 ...]

The update is r1jax.trainers.grpo.grpo_train_step (the GRPO loss from the
final hidden states through the chunked log-prob kernel, its backward, AdamW
and the non-finite guard), jitted as training jits it (state donated), on one
synthetic rollout batch: `rows` rows of `seq` tokens, every position real (a
prompt of 128 tokens or seq / 4, the rest completion), random tokens, old log-probs and
advantages; beta 0, temperature 1. Activations are `dtype` (bfloat16 by
default) over float32 params and moments.

Model FLOPs of a step = 3 x the forward's (benchmarks/roofline.py:
forward_flops: every weight matmul at every position, the tied output head
included, plus causal attention); rematerialised work is not counted, as MFU
does not count it. MFU = model FLOPs / median step time / the datasheet's
dense peak of the device for `dtype` (PEAK below; none on a CPU). "of matmul"
divides by the best rate of the model's largest matmul shape, [tokens, D] x
[D, F], measured in the same process instead.

Each variant (comma-separated key=value over the flags: attention xla|cudnn,
remat 0|1, rows, seq, micro (gradient-accumulation chunks), impl
(chunked|reference), dtype, layers) runs in a child process of its own, so
that one that runs out of memory leaves the rest of the table. On a CPU, try
`--preset tiny --rows 8 --seq 256 --dtype float32`.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

import numpy as np

# Dense peak FLOP/s by device kind (substring of jax's device_kind) and dtype,
# from the vendors' datasheets (NVIDIA: SXM parts, without sparsity).
PEAK = {
    "H100": {"bfloat16": 989.4e12, "float32": 494.7e12},  # float32 = TF32 tensor cores
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6": {"bfloat16": 918e12},
}

DEFAULTS = dict(preset="qwen2.5-math-1.5b", rows=8, seq=1024, attention="xla", remat=0,
                micro=1, impl="chunked", dtype="bfloat16", layers=0, steps=5)
PROMPT_LEN = 128


def peak_flops(device_kind: str, dtype: str):
  for name, peaks in PEAK.items():
    if name in device_kind:
      return peaks.get(dtype)
  return None


def run_one(v: dict) -> dict:
  """Builds, compiles and times one variant in this process. jax is imported
  here, in the child, so that the parent never claims accelerator memory."""
  import jax
  import jax.numpy as jnp
  import optax

  import roofline
  from r1jax.losses.grpo import GRPOLoss
  from r1jax.models.config import get_preset
  from r1jax.models.transformer import Transformer, count_params
  from r1jax.parallel.mesh import batch_sharding, make_mesh, mesh_rules
  from r1jax.trainers import grpo
  from r1jax.trainers.sft import jit_train_step
  from r1jax.trainers.state import create_train_state

  cfg = get_preset(v["preset"]).replace(
      dtype=v["dtype"], attention_impl=v["attention"], remat=bool(int(v["remat"])),
      max_position_embeddings=max(int(v["seq"]), 512))
  if int(v["layers"]):
    cfg = cfg.replace(num_hidden_layers=int(v["layers"]))
  rows, seq, micro = int(v["rows"]), int(v["seq"]), int(v["micro"])
  model = Transformer(cfg)
  mesh = make_mesh({"data": -1})
  tx = optax.adamw(1e-6)
  began = time.perf_counter()
  phase = lambda what: print(f"[{time.perf_counter() - began:6.1f} s] {what}", file=sys.stderr,
                             flush=True)
  state, shardings = create_train_state(model, tx, mesh, seed=0, init_params=random_params(model, mesh))
  phase("params and moments made")
  step_fn = lambda s, b: grpo.grpo_train_step(s, b, model=model, loss=GRPOLoss(beta=0.0), tx=tx,
                                              temperature=1.0, impl=v["impl"], micro_batches=micro)

  # build_batch pads prompt + completion + 1 up to a multiple of 32: seq - 1
  # tokens make rows of exactly `seq`.
  rng = np.random.default_rng(0)
  P = min(PROMPT_LEN, seq // 4)
  N = seq - 1 - P
  prompts = [rng.integers(4, cfg.vocab_size, P).tolist() for _ in range(rows)]
  host = grpo.build_batch(prompts, 1, rng.integers(4, cfg.vocab_size, (rows, N)),
                          -rng.exponential(2.0, (rows, N)).astype(np.float32),
                          np.full(rows, N), np.ones(rows, bool),
                          rng.standard_normal(rows).astype(np.float32), pad_id=0)
  assert host["tokens"].shape == (rows, seq), host["tokens"].shape

  with mesh_rules(mesh):
    jitted = jit_train_step(step_fn, shardings, mesh)
    batch = jax.device_put(host, batch_sharding(mesh))
    t0 = time.perf_counter()
    state, m = jitted(state, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    phase(f"first step (compilation) done: {compile_s:.0f} s")
    times = []
    for _ in range(int(v["steps"])):
      t0 = time.perf_counter()
      state, m = jitted(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
  loss = float(m["loss"])
  step_s = float(np.median(times))

  flops = roofline.train_flops(cfg, rows, seq)
  dtype = jnp.dtype(v["dtype"])
  mm_rows = min(rows * seq, 16384)
  mm_rate = roofline.matmul_rate(mm_rows, cfg.hidden_size, cfg.intermediate_size, dtype)
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind, v["dtype"])
  stats = device.memory_stats() or {}
  return dict(v, device=device.device_kind, params=count_params(state.params),
              tokens=rows * seq, compile_s=compile_s, step_s=step_s,
              step_spread=(max(times) - min(times)) / step_s, loss=loss,
              tflops=flops / step_s / 1e12, mfu=flops / step_s / peak if peak else None,
              peak_tflops=peak / 1e12 if peak else None, matmul_tflops=mm_rate / 1e12,
              of_matmul=flops / step_s / mm_rate, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)


def random_params(model, mesh=None, seed: int = 0):
  """N(0, 0.02) weights (norm scales 1), replicated on `mesh` when given, one
  small jitted draw per distinct leaf shape (every benchmark's random model).
  One jit of the whole 28-layer init tripped XLA's slow-compile alarm on an
  H100 and had not finished after 170 s; with these draws a whole variant
  (two compilations) took ~80 s."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32)))["params"]
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed), len(paths_leaves))
  draw = jax.jit(lambda key, ones, shape, dtype: jnp.ones(shape, dtype) if ones else
                 (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                 static_argnums=(1, 2, 3))
  # On the mesh, as create_train_state's own init puts them (single-device
  # arrays made the step compile a second time once it returned mesh arrays).
  place = ((lambda x: x) if mesh is None else functools.partial(
      jax.device_put, device=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  return jax.tree_util.tree_unflatten(treedef, [
      place(draw(k, getattr(path[-1], "key", "") == "scale", x.shape, x.dtype))
      for k, (path, x) in zip(keys, paths_leaves)])


def parse_variant(text: str, base: dict) -> dict:
  v = dict(base)
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    if key not in DEFAULTS:
      raise SystemExit(f"unknown variant key {key!r} in {text!r}; known: {sorted(DEFAULTS)}")
    v[key] = value
  return v


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for key, value in DEFAULTS.items():
    parser.add_argument(f"--{key}", type=type(value), default=value)
  parser.add_argument("--variants", nargs="*", default=[""],
                      help="comma-separated key=value overrides, one child process each")
  parser.add_argument("--child-timeout", type=float, default=600,
                      help="seconds one variant may take, compilation included")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one JSON variant
  args = parser.parse_args()
  if args.one:
    print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
    return
  base = {k: getattr(args, k) for k in DEFAULTS}
  results = []
  variants = [(text, parse_variant(text, base)) for text in args.variants]  # all checked first
  for text, v in variants:
    try:
      proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(v)],
                            capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as e:
      print(f"variant {text or '(defaults)'} ran past {args.child_timeout} s; its output:\n"
            f"{(e.stdout or b'')[-2000:]!r}\n{(e.stderr or b'')[-2000:]!r}", flush=True)
      results.append(dict(v, failed=True))
      continue
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
      print(f"variant {text or '(defaults)'} failed (exit {proc.returncode}):\n{tail}", flush=True)
      results.append(dict(v, failed=True))
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    results.append(r)
    print(json.dumps(r), flush=True)
  print()
  print(f"{'variant':<40}{'layers':>7}{'tokens':>8}{'step s':>8}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'of matmul':>10}{'peak GiB':>10}{'compile s':>11}{'loss':>11}")
  for r in results:
    name = ",".join(f"{k}={r[k]}" for k in ("attention", "remat", "rows", "seq", "micro", "impl")
                    if str(r[k]) != str(DEFAULTS[k]) or k == "attention")
    if r.get("failed"):
      print(f"{name:<40}  failed")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    layers = r["layers"] if int(r["layers"]) else "all"
    print(f"{name:<40}{layers:>7}{r['tokens']:>8}{r['step_s']:>8.3f}{r['tflops']:>9.1f}{mfu:>7}"
          f"{r['of_matmul']:>10.1%}{r['peak_gib']:>10.1f}{r['compile_s']:>11.0f}{r['loss']:>11.6f}")
  if results and not results[0].get("failed"):
    r = results[0]
    peak = f"{r['peak_tflops']:.0f}" if r["peak_tflops"] else "unknown"
    print(f"device {r['device']}; {r['preset']} {r['params']:,} params, {r['dtype']}; "
          f"datasheet peak {peak} TFLOP/s; measured matmul {r['matmul_tflops']:.0f} TFLOP/s")


if __name__ == "__main__":
  main()

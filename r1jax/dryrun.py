"""Dry-run planner: what a config needs per device, before booking a pod.

  python -m r1jax.dryrun --config=configs/r1_zero.py:deepseek-v3 --topology=v5p-1024
  python -m r1jax.dryrun --config=configs/r1_zero.py:qwen2.5-math-7b \
      --config.mesh.fsdp=16 --num_devices=64 --device=h100-80gb
  python -m r1jax.dryrun --model=qwen2.5-math-1.5b --mesh=fsdp=-1 --num_devices=8 \
      --batch=64 --seq_len=4096 [--param_dtype=bfloat16 --remat]

Prints one JSON object. Nothing is allocated and no device is needed: the
model's params are traced with `jax.eval_shape`, the train state's shardings
come from the same logical rules the trainers use, laid over an
`AbstractMesh` of `--num_devices` (or `--topology`'s chips). Figures:

- params: total, active per token (MoE: minus the routed experts a token does
  not pick, the model's `count_active_params`), and the matmul params that
  set the FLOPs (active minus an untied input-embedding lookup).
- bytes per device of params, Adam moments (sharded like their params),
  gradients (the params' dtype and sharding), the GRPO reference policy and
  the model state, from each leaf's per-device shard. A dimension that does
  not divide its mesh axes is sharded over the axes that do divide it, as the
  trainers place it (r1jax.parallel.mesh.divisible_spec), and is listed in
  `indivisible`.
- activations per micro-batch per device: the tensors one training step keeps
  for the backward pass (`activation_formula`), tokens split over the batch
  axes (data x fsdp), head/ffn widths over `tensor`.
- FLOPs per optimizer step (6 N T-per-token + attention), per generated token
  (2 N + attention over the KV cache), and for a whole GRPO step.
- for each known device (HBM per chip), whether the total fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from r1jax.parallel.mesh import DEFAULT_RULES, MESH_AXES

GiB = 2 ** 30

# HBM per device (one JAX device per chip: a v5p/v4 chip's two TensorCores act
# as one megacore device) and dense bf16 peak FLOP/s per device.
DEVICES: dict[str, dict[str, float]] = {
    "tpu-v5p": dict(hbm_bytes=95 * GiB, peak_bf16_flops=459e12, cores_per_chip=2),
    "tpu-v5e": dict(hbm_bytes=16 * GiB, peak_bf16_flops=197e12, cores_per_chip=1),
    "tpu-v6e": dict(hbm_bytes=32 * GiB, peak_bf16_flops=918e12, cores_per_chip=1),
    "h100-80gb": dict(hbm_bytes=80 * GiB, peak_bf16_flops=989e12, cores_per_chip=1),
}
_TOPOLOGY_PREFIX = {"v5p": "tpu-v5p", "v5litepod": "tpu-v5e", "v5e": "tpu-v5e",
                    "v6e": "tpu-v6e"}

ACTIVATION_FORMULA = (
    "per token per layer, bytes (a = activation dtype bytes, tp = tensor axis size): "
    "a*(4*D + (q + k + v + attn_out widths)/tp + ffn_saved/tp) + 4*N*T/tp "
    "[4*D: block input, attention-norm output, mid-block residual, mlp-norm output; "
    "q/k/v/attn_out: the projections' outputs (dense: N*H, K*H, K*H, N*H; MLA: q and "
    "kv latents + per-head q/k (Hn+Hr) and v (Hv)); ffn_saved: 3*F for SwiGLU (gate, up, "
    "gate*up), an MoE layer 3*F_moe*(top_k + shared) + top_k*D for the dispatched inputs; "
    "4*N*T: float32 attention probabilities, the full T x T per head as XLA's attention "
    "materialises them]; times tokens per device (rows / (data*fsdp) * T) and layers. "
    "With model.remat only each block's input (a*D) is kept per layer, plus one layer's "
    "full set during its recomputation. Logits: rows*T*V/tp*4 bytes with loss.impl="
    "reference only (the chunked/pallas kernels never materialise them).")


# ---------------------------------------------------------------------------
# Mesh and state.
# ---------------------------------------------------------------------------

def resolve_mesh(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 resolved against `num_devices` (as make_mesh does)."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dict(axis_sizes)}")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"not {num_devices}")
  return sizes


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
  """A mesh of the given shape without devices behind it."""
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_state(model, tx: optax.GradientTransformation, mesh: AbstractMesh, rules,
                   notes: list | None = None):
  """(params, Adam-style optimizer state, model state) as sharded ShapeDtypeStructs.

  Params and model state: r1jax.trainers.state.abstract_train_state (the
  trainers' own rules). The optimizer state's param-shaped parts (moments)
  take their params' shardings; the rest (counts) is replicated.
  """
  from r1jax.trainers.state import abstract_train_state
  state = abstract_train_state(model, tx, mesh, rules, notes)
  rep = NamedSharding(mesh, PartitionSpec())
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  opt_state = optax.tree_map_params(
      tx, sds, state.opt_state, jax.tree.map(lambda x: x.sharding, state.params),
      transform_non_params=lambda x: sds(x, rep))
  return state.params, opt_state, state.model_state


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, sizes: Mapping[str, int]
                ) -> tuple[tuple[int, ...], bool]:
  """(per-device shard shape, whether every dimension divides its mesh axes);
  an indivisible dimension counts padded up (ceil)."""
  out, even = [], True
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(sizes[a] for a in axes)
    out.append(-(-dim // parts))
    even &= dim % parts == 0
  return tuple(out), even


def tree_bytes(tree, sizes: Mapping[str, int], indivisible: list[str] | None = None,
               what: str = "") -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = x.sharding.spec if x.sharding is not None else PartitionSpec()
    shard, even = shard_shape(x.shape, spec, sizes)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
    if not even and indivisible is not None:
      indivisible.append(f"{what}{jax.tree_util.keystr(path)} {tuple(x.shape)} over {spec}")
  return total


# ---------------------------------------------------------------------------
# Counts and the per-token model.
# ---------------------------------------------------------------------------

def count_params(model, params) -> dict[str, int]:
  """total / main (without MTP modules) / active per token / matmul (FLOPs) params."""
  c = model.config
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  module = sys.modules[type(model).__module__]
  if hasattr(module, "count_active_params"):  # MoE: the model says what a token uses
    main = module.count_main_params(params) if hasattr(module, "count_main_params") else total
    active = module.count_active_params(params, c)
    return dict(total=total, main=main, active=active, matmul=active)
  lookup = 0 if c.tie_word_embeddings else math.prod(params["embed_tokens"]["embedding"].shape)
  return dict(total=total, main=total, active=total, matmul=total - lookup)


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the activation and FLOP estimates need from a model config."""

  layers: int
  hidden: int  # D
  heads: int  # N
  qk_head: int  # per-head q/k width (dense H; MLA Hn + Hr)
  v_head: int  # per-head v width
  attn_widths: int  # q + k + v + attention output, per token
  ffn_saved: tuple[int, ...]  # per layer: SwiGLU/MoE widths kept for the backward pass
  vocab: int

  @classmethod
  def of(cls, c) -> "Shape":
    D, N, L = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    if hasattr(c, "kv_lora_rank"):  # MLA (DeepSeek-V3)
      qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
      latents = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim
      widths = latents + N * qk + N * qk + N * v + N * v
    else:
      H, K = c.head_size, c.num_key_value_heads
      qk, v = H, H
      widths = N * H + 2 * K * H + N * H
    ffn = []
    for i in range(L):
      if hasattr(c, "n_routed_experts") and c.is_moe_layer(i):
        k = c.num_experts_per_tok
        ffn.append(3 * c.moe_intermediate_size * (k + c.n_shared_experts) + k * D)
      else:
        ffn.append(3 * c.intermediate_size)
    return cls(layers=L, hidden=D, heads=N, qk_head=qk, v_head=v, attn_widths=widths,
               ffn_saved=tuple(ffn), vocab=c.vocab_size)


def activation_bytes(shape: Shape, *, rows: int, seq_len: int, sizes: Mapping[str, int],
                     act_bytes: int, remat: bool, logits: bool) -> int:
  """Activation memory of one training micro-batch on one device (ACTIVATION_FORMULA)."""
  tp = sizes["tensor"]
  tokens = -(-rows // (sizes["data"] * sizes["fsdp"])) * seq_len
  per_layer = [act_bytes * (4 * shape.hidden + (shape.attn_widths + f) / tp)
               + 4 * shape.heads * seq_len / tp for f in shape.ffn_saved]
  if remat:
    per_token = act_bytes * shape.hidden * shape.layers + max(per_layer)
  else:
    per_token = sum(per_layer)
  total = tokens * per_token
  if logits:
    total += tokens * shape.vocab / tp * 4
  return int(total)


def train_flops_per_token(shape: Shape, matmul_params: int, seq_len: int) -> float:
  """6 N (forward + backward matmuls) + attention 6 L T N (Hqk + Hv), no causal discount
  (the PaLM / MFU convention)."""
  attn = 6 * shape.layers * seq_len * shape.heads * (shape.qk_head + shape.v_head)
  return 6 * matmul_params + attn


def forward_flops_per_token(shape: Shape, matmul_params: int, context: float) -> float:
  """2 N + attention over `context` cached keys: 2 L S N (Hqk + Hv)."""
  return 2 * matmul_params + 2 * shape.layers * context * shape.heads * (
      shape.qk_head + shape.v_head)


# ---------------------------------------------------------------------------
# The plan.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Workload:
  """One optimizer step's micro-batch, and the GRPO rollout around it (if any)."""

  rows: int  # sequences per optimizer step (global)
  seq_len: int  # T
  updates_per_step: int = 1  # optimizer steps per GRPO step (mini-batches x mu)
  prompts: int = 0  # GRPO: prompts per step (0 = SFT, no rollout)
  samples_per_prompt: int = 0  # G
  prompt_len: int = 0
  new_tokens: int = 0
  reference: bool = False  # GRPO with beta > 0: a reference policy on the mesh


def workload_from_config(config, *, prompt_len: int | None = None) -> Workload:
  """The micro-batch (and rollout) of an experiment config: GRPO or SFT."""
  if "grpo" in config:
    g = config.grpo
    positions = config.model.get("max_position_embeddings", 4096)
    if prompt_len is None:
      # The configured prompt budget; else what the positions leave, capped at
      # 1024 tokens (a long-context model's positions are no prompt length).
      prompt_len = g.get("max_prompt_tokens", 0) or min(positions - g.max_new_tokens, 1024)
    rows = g.prompts_per_step * g.num_generations // g.get("num_minibatches", 1)
    return Workload(
        rows=rows, seq_len=prompt_len + g.max_new_tokens,
        updates_per_step=g.updates_per_rollout * g.get("num_minibatches", 1),
        prompts=g.prompts_per_step, samples_per_prompt=g.num_generations,
        prompt_len=prompt_len, new_tokens=g.max_new_tokens, reference=g.beta > 0)
  return Workload(rows=config.data.batch_size, seq_len=config.data.seq_len)


def plan(model_fields: Mapping[str, Any], mesh_axes: Mapping[str, int], num_devices: int,
         workload: Workload, *, rules=DEFAULT_RULES, loss_impl: str = "auto",
         mfu: float = 0.4) -> dict[str, Any]:
  """The dry-run figures (see the module docstring) as a JSON-able dict."""
  from r1jax.models.build import build_model
  t0 = time.perf_counter()
  model = build_model(dict(model_fields))
  c = model.config
  sizes = resolve_mesh(mesh_axes, num_devices)
  mesh = abstract_mesh(sizes)
  tx = optax.adamw(1e-4)  # the trainers' AdamW: two moments per param, one count
  indivisible: list[str] = []  # dimensions sharded over fewer axes than the rules say
  params, opt_state, model_state = abstract_state(model, tx, mesh, rules, indivisible)
  counts = count_params(model, params)
  b_params = tree_bytes(params, sizes, indivisible, "params")
  b_opt = tree_bytes(opt_state, sizes)
  b_state = tree_bytes(model_state, sizes)
  b_ref = b_params + b_state if workload.reference else 0
  batch_shards = sizes["data"] * sizes["fsdp"]
  if workload.rows % batch_shards:  # the trainers' batch sharding would refuse it
    indivisible.append(f"batch: {workload.rows} rows over data x fsdp = {batch_shards}")
  shape = Shape.of(c)
  act_bytes = np.dtype(c.dtype).itemsize
  b_act = activation_bytes(shape, rows=workload.rows, seq_len=workload.seq_len, sizes=sizes,
                           act_bytes=act_bytes, remat=c.remat, logits=loss_impl == "reference")
  per_device = dict(params=b_params, optimizer_state=b_opt, gradients=b_params,
                    model_state=b_state, reference_params=b_ref, activations=b_act)
  per_device["total"] = sum(per_device.values())

  tokens = workload.rows * workload.seq_len
  step_flops = train_flops_per_token(shape, counts["matmul"], workload.seq_len) * tokens
  flops = dict(train_step=step_flops, train_per_token=step_flops / tokens)
  if workload.prompts:
    N = workload.prompts * workload.samples_per_prompt
    context = workload.prompt_len + workload.new_tokens / 2  # average decode context
    per_gen = forward_flops_per_token(shape, counts["matmul"], context)
    prefill = workload.prompts * workload.prompt_len * forward_flops_per_token(
        shape, counts["matmul"], workload.prompt_len / 2)
    rollout = prefill + N * workload.new_tokens * per_gen
    total_tokens = N * workload.seq_len
    reference = (forward_flops_per_token(shape, counts["matmul"], workload.seq_len / 2)
                 * total_tokens if workload.reference else 0.0)
    flops.update(per_generated_token=per_gen, rollout=rollout, reference_forward=reference,
                 grpo_step=rollout + reference + step_flops * workload.updates_per_step)
  else:
    flops["per_generated_token"] = forward_flops_per_token(shape, counts["matmul"],
                                                           workload.seq_len / 2)
  step_total = flops.get("grpo_step", step_flops)
  fits = {}
  for name, d in DEVICES.items():
    fits[name] = dict(
        fits=per_device["total"] <= d["hbm_bytes"],
        hbm_gib=d["hbm_bytes"] / GiB, used_fraction=round(per_device["total"] / d["hbm_bytes"], 4),
        step_seconds_at_mfu=step_total / (num_devices * d["peak_bf16_flops"] * mfu))
  return dict(
      model=type(model).__name__, params=counts,
      mesh=sizes, num_devices=num_devices,
      workload=dataclasses.asdict(workload),
      dtypes=dict(params=c.param_dtype, activations=c.dtype), remat=c.remat,
      bytes_per_device=per_device,
      gib_per_device={k: round(v / GiB, 3) for k, v in per_device.items()},
      indivisible=indivisible, flops=flops, mfu_assumed=mfu, devices=fits,
      activation_formula=ACTIVATION_FORMULA,
      planner_seconds=round(time.perf_counter() - t0, 2))


def topology_devices(topology: str) -> tuple[str, int]:
  """`v5p-1024` -> ("tpu-v5p", 512): a v5p/v4 slice is named by TensorCores, two
  per chip (one JAX device); v5e/v6e slices by chips."""
  kind, _, count = topology.rpartition("-")
  if kind not in _TOPOLOGY_PREFIX or not count.isdigit():
    raise ValueError(f"unknown topology {topology!r}; e.g. v5p-1024, v5litepod-256, v6e-256")
  device = _TOPOLOGY_PREFIX[kind]
  cores = DEVICES[device]["cores_per_chip"]
  return device, int(count) // int(cores)


def parse_mesh(text: str) -> dict[str, int]:
  """`data=-1,fsdp=8` -> {"data": -1, "fsdp": 8}."""
  out = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    out[name.strip()] = int(value)
  return out


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

def main(argv):
  from absl import flags
  from r1jax.errors import UserError
  del argv
  F = flags.FLAGS
  try:
    if (F.config is None) == (F.model is None):
      raise UserError("give exactly one of --config=FILE.py:PRESET and --model=PRESET")
    if F.topology:
      device, num_devices = topology_devices(F.topology)
    else:
      device, num_devices = F.device, F.num_devices
    if F.config is not None:
      config = F.config
      model_fields = config.model
      mesh_axes = parse_mesh(F.mesh) if F.mesh else dict(config.mesh)
      workload = workload_from_config(config, prompt_len=F.prompt_len)
      loss_impl = config.get("loss", {}).get("impl", "auto")
    else:
      from r1jax.models.build import get_preset
      model_fields = dataclasses.asdict(get_preset(F.model))
      if F.param_dtype:
        model_fields.update(param_dtype=F.param_dtype, dtype=F.param_dtype)
      if F.remat is not None:
        model_fields.update(remat=F.remat)
      mesh_axes = parse_mesh(F.mesh or "fsdp=-1")
      workload = Workload(rows=F.batch, seq_len=F.seq_len)
      loss_impl = "auto"
    if F.batch is not None and F.config is not None:
      workload.rows = F.batch
    if F.seq_len is not None and F.config is not None:
      workload.seq_len = F.seq_len
    result = plan(model_fields, mesh_axes, num_devices, workload, loss_impl=loss_impl)
  except (UserError, ValueError, KeyError) as e:
    print(f"r1jax.dryrun: error: {e}", file=sys.stderr)
    sys.exit(2)
  if device is not None:
    result["device"] = device
    result["fits"] = result["devices"][device]["fits"]
  if F.topology:
    result["topology"] = F.topology
  print(json.dumps(result, indent=None if F.compact else 2))


def run():
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. "
                                  "configs/r1_zero.py:deepseek-v3; --config.a.b=v overrides.")
  flags.DEFINE_string("model", None, "A model preset instead of --config, e.g. qwen2.5-math-7b "
                      "(an SFT/distillation workload of --batch x --seq_len).")
  flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. data=-1,fsdp=8 (default: the "
                      "config's mesh; fsdp=-1 with --model).")
  flags.DEFINE_integer("num_devices", 8, "Devices of the (fake) mesh.")
  flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5p-1024 (= 512 v5p chips): sets "
                      "--num_devices and --device.")
  flags.DEFINE_enum("device", None, list(DEVICES), "Device to report `fits` for.")
  flags.DEFINE_integer("batch", None, "Sequences per optimizer step (--model: default 64).")
  flags.DEFINE_integer("seq_len", None, "Tokens per sequence (--model: default 4096).")
  flags.DEFINE_integer("prompt_len", None, "GRPO prompt tokens (default: the config's budget, "
                       "at most 1024).")
  flags.DEFINE_string("param_dtype", None, "--model: params and activations dtype, e.g. "
                      "bfloat16 (default: the preset's).")
  flags.DEFINE_bool("remat", None, "--model: rematerialise each block (default: the preset's).")
  flags.DEFINE_bool("compact", False, "One-line JSON.")

  def main_with_defaults(argv):
    F = flags.FLAGS
    if F.model is not None:
      F.batch = 64 if F.batch is None else F.batch
      F.seq_len = 4096 if F.seq_len is None else F.seq_len
    main(argv)

  app.run(main_with_defaults)


if __name__ == "__main__":
  run()

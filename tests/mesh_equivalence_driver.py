"""Sharded equals unsharded, for tests/test_mesh_equivalence.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/mesh_equivalence_driver.py '[["dense", {"data": 8}, false], ...]' \
      '["sft", "sample"]'

For each (model case, mesh) and each of the asked kinds: 3 SFT steps
(sft.train_step through sft.jit_train_step) or 3 GRPO steps
(grpo.grpo_train_step, same jit) from the same params and batch as a
single-device run, and (`sample`, where the case's third entry is true) the
sampler on the mesh's sharded params. The test runs two of these side by
side (["sft", "sample"] and ["grpo"]) to use both cores. Prints one JSON line:
per case the largest differences from the single-device run, and every param
/ Adam-moment leaf whose sharding spec or per-device shard shape is not what
the logical rules say. The parent test asserts on it.

Model cases: CASES (the tiny dense decoder; the tiny DeepSeek-V3 MoE, whose router
biases are model state that the step moves and that must move the same).
"""

import functools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax.losses.grpo import group_advantages
from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import batch_sharding, logical_shardings, make_mesh, mesh_rules
from r1jax.sampling.sampler import SamplingConfig, sample
from r1jax.trainers import grpo, sft
from r1jax.trainers.optim import make_optimizer
from r1jax.trainers.state import create_train_state, state_collections

# What the default logical rules (r1jax.parallel.mesh.DEFAULT_RULES) must give
# each dense param, written out by hand so a change of the rules or of a
# module's annotations shows up here: (module, param) -> mesh axis per dim.
DENSE_SPECS = {
    ("embed_tokens", "embedding"): ("tensor", "fsdp"),  # (vocab, embed)
    ("lm_head", "kernel"): ("fsdp", "tensor"),  # (embed, vocab)
    ("q_proj", "kernel"): ("fsdp", "tensor", None),  # (embed, heads, head_dim)
    ("k_proj", "kernel"): ("fsdp", "tensor", None),  # (embed, kv_heads, head_dim)
    ("v_proj", "kernel"): ("fsdp", "tensor", None),
    ("q_proj", "bias"): ("tensor", None),  # (heads, head_dim)
    ("k_proj", "bias"): ("tensor", None),
    ("v_proj", "bias"): ("tensor", None),
    ("o_proj", "kernel"): ("tensor", None, "fsdp"),  # (heads, head_dim, embed)
    ("gate_proj", "kernel"): ("fsdp", "tensor"),  # (embed, mlp)
    ("up_proj", "kernel"): ("fsdp", "tensor"),
    ("down_proj", "kernel"): ("tensor", "fsdp"),  # (mlp, embed)
    ("input_layernorm", "scale"): (None,),
    ("post_attention_layernorm", "scale"): (None,),
    ("norm", "scale"): (None,),
}


def dense_case():
  """Tiny dense decoder with every kind of param (q/k/v biases, untied head); sizes
  divide a tensor axis of 4 (vocab 64, 8 heads, 4 kv heads, mlp 64)."""
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                       max_position_embeddings=128, qkv_bias=True, tie_word_embeddings=False)
  return Transformer(config), DENSE_SPECS


# The tiny MoE's extra params: MLA projections (latent ranks are not sharded),
# the router, and the routed experts' stacked weights on `expert`.
MOE_SPECS = {**DENSE_SPECS, **{
    ("q_a_proj", "kernel"): ("fsdp", None),  # (embed, q_lora)
    ("q_b_proj", "kernel"): (None, "tensor", None),  # (q_lora, heads, head_dim)
    ("kv_a_proj_with_mqa", "kernel"): ("fsdp", None),  # (embed, kv_lora + rope)
    ("kv_b_proj", "kernel"): (None, "tensor", None),  # (kv_lora, heads, head_dim)
    ("q_a_layernorm", "scale"): (None,),
    ("kv_a_layernorm", "scale"): (None,),
    ("gate", "kernel"): ("fsdp", None),  # router (embed, experts)
    ("experts", "gate_proj"): ("expert", "fsdp", "tensor"),  # (experts, embed, mlp)
    ("experts", "up_proj"): ("expert", "fsdp", "tensor"),
    ("experts", "down_proj"): ("expert", "tensor", "fsdp"),  # (experts, mlp, embed)
}}


def moe_case():
  """Tiny DeepSeek-V3: 1 dense + 1 MoE layer (MLA, 8 routed experts in 4 groups,
  top-2 of 2 groups, 1 shared expert), dropless dispatch; sizes divide a tensor
  or expert axis of 4."""
  from r1jax.models import deepseek_v3  # pylint: disable=import-outside-toplevel
  config = deepseek_v3.get_preset(
      "deepseek-v3-tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
      moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1,
      num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
      qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)
  return deepseek_v3.make_model(config), MOE_SPECS


CASES = {"dense": dense_case, "moe": moe_case}


def expected_spec(path, leaf, table) -> tuple:
  keys = tuple(getattr(k, "key", str(k)) for k in path)
  spec = table.get(keys[-2:])
  if spec is None:
    raise KeyError(f"no expected sharding for param {'/'.join(keys)}: add it to the table")
  return tuple(spec) + (None,) * (leaf.ndim - len(spec))


def shard_shape(shape, spec, mesh) -> tuple:
  out = []
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    out.append(dim // int(np.prod([mesh.shape[a] for a in axes], dtype=int)))
  return tuple(out)


def layout_errors(shardings, shapes, table, mesh, what) -> list[str]:
  """Leaves whose spec or per-device shard shape differ from the table under `mesh`."""
  errors = []
  for (path, sharding), shape in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                                     jax.tree.leaves(shapes)):
    want = expected_spec(path, shape, table)
    spec = tuple(getattr(sharding, "spec", ()))
    got = spec + (None,) * (shape.ndim - len(spec))
    name = f"{what}{jax.tree_util.keystr(path)}"
    if got != want:
      errors.append(f"{name}: spec {got}, want {want}")
    want_shard = shard_shape(shape.shape, want, mesh)
    got_shard = {tuple(len(range(*i.indices(n))) for i, n in zip(idx, shape.shape))
                 for idx in sharding.devices_indices_map(shape.shape).values()}
    if got_shard != {want_shard} or len(sharding.device_set) != mesh.size:
      errors.append(f"{name}: shards {sorted(got_shard)} on {len(sharding.device_set)} devices, "
                    f"want {want_shard} on {mesh.size}")
  return errors


def host_params(model, seed=0):
  """Random params on the host (no init compile); norm scales 1 + noise; the
  model's state (MoE router biases) random too, so selection is biased."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)
  fill = lambda path, x: (rng.normal(0.0, 0.1, x.shape) + (path[-1].key == "scale")
                          ).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(fill, nn.unbox(boxed["params"]))
  model_state = {k: jax.tree_util.tree_map_with_path(fill, nn.unbox(v))
                 for k, v in boxed.items() if k in state_collections(model)}
  return boxed["params"], params, model_state


def sft_batch(rng, vocab, B=8, T=32):
  """Two packed documents per row, padding at the end."""
  tokens = rng.integers(1, vocab, (B, T)).astype(np.int32)
  cut = rng.integers(4, T - 8, B)
  seg = np.where(np.arange(T)[None] < cut[:, None], 1, 2).astype(np.int32)
  seg[:, T - 3:] = 0
  pos = np.where(seg == 1, np.arange(T)[None], np.arange(T)[None] - cut[:, None]).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  weights = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
  return dict(tokens=tokens, targets=targets, segment_ids=seg, positions=pos * (seg > 0),
              loss_weights=weights)


def config():
  c = ml_collections.ConfigDict(dict(
      optim=dict(learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0, b1=0.9, b2=0.99,
                 # eps 1e-3, not 1e-8: Adam's first step is ~lr * sign(g), which turns a
                 # 1e-9 gradient difference into a 2 * lr param difference; a large eps
                 # keeps the update smooth in g, so param differences track grad ones.
                 eps=1e-3, weight_decay=0.1, clip_grad_norm=1.0),
      grpo=dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                loss_aggregation="seq_mean_token_mean", max_new_tokens=8, mask_truncated=False)))
  return c


def grpo_batch(rng, vocab, prompts, G=4, N=8):
  """A rollout batch: random completions of random lengths, sampling-time
  log-probs off the current policy (so the ratio is clipped somewhere), a
  reference a little further off (the KL term is not 0)."""
  B = len(prompts) * G
  tokens = rng.integers(2, vocab, (B, N)).astype(np.int32)
  lengths = rng.integers(1, N + 1, B).astype(np.int32)
  logprobs = rng.normal(-4.2, 0.5, (B, N)).astype(np.float32)
  rewards = rng.integers(0, 3, B).astype(np.float32)
  adv = np.asarray(group_advantages(jnp.asarray(rewards.reshape(-1, G)))).reshape(-1)
  batch = grpo.build_batch(prompts, G, tokens, logprobs, lengths, lengths < N, adv, pad_id=0)
  batch["ref_logp"] = (batch["old_logp"] - 0.3 * batch["mask"]).astype(np.float32)
  return batch


def run_mesh(kinds, model, boxed, params_host, model_state, mesh, batches, prompts, sc):
  """The `kinds` ("sft", "grpo": 3 train steps; "sample": the sampler) on `mesh`."""
  c = config()
  tx = make_optimizer(c.optim, 10)
  shardings = nn.unbox(logical_shardings(boxed, mesh))
  steps = dict(sft=functools.partial(sft.train_step, model=model, tx=tx),
               grpo=functools.partial(grpo.grpo_train_step, model=model,
                                      loss=grpo.make_loss(c.grpo), tx=tx, temperature=1.0))
  out = {}
  with mesh_rules(mesh):
    for kind in kinds:
      params = jax.device_put(params_host, shardings)
      if kind == "sample":  # on the trainer's sharded params: no copy to another layout
        out[kind] = jax.device_get(sample(model, params, prompts, jax.random.key(3), sc,
                                          eos_id=1, model_state=model_state or None))
        continue
      state, state_shardings = create_train_state(model, tx, mesh, 0, init_params=params,
                                                  init_model_state=model_state or None)
      step = sft.jit_train_step(steps[kind], state_shardings, mesh)
      out[kind] = three_steps(step, state, jax.device_put(batches[kind], batch_sharding(mesh)))
  return out


def three_steps(step, state, batch):
  """(loss, params and model state after the first step, that state's shardings,
  compiles after 3 steps)."""
  state, m = step(state, batch)
  first = (jax.device_get(m["loss"]), jax.device_get((state.params, state.model_state)),
           jax.tree.map(lambda x: x.sharding, state))
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return first + (step._cache_size(),)


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(cases, kinds):
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for name in sorted({case[0] for case in cases}):
    rng = np.random.default_rng(0)
    model, table = CASES[name]()
    boxed, params_host, model_state = host_params(model)
    vocab = model.config.vocab_size
    prompts = [rng.integers(2, vocab, n).tolist() for n in (5, 11)]
    batches = dict(sft=sft_batch(rng, vocab), grpo=grpo_batch(rng, vocab, prompts))
    # eos 1 and four stop ids: some of the 8 rows stop early (p = 5/64 a step).
    sc = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=4,
                        stop_token_ids=(2, 3, 4, 5))
    one = make_mesh({"data": 1}, devices=jax.devices()[:1])
    ref = run_mesh(kinds, model, boxed, params_host, model_state, one, batches, prompts, sc)
    for case_name, axes, with_sampler in cases:
      if case_name != name:
        continue
      mesh = make_mesh(axes)
      run = [k for k in kinds if k != "sample" or with_sampler]
      got = run_mesh(run, model, boxed, params_host, model_state, mesh, batches, prompts, sc)
      r = dict(mesh=dict(mesh.shape))
      for kind in set(run) - {"sample"}:
        loss, (params, new_model_state), state, compiles = got[kind]
        r[f"{kind}_compiles"] = compiles
        r[f"{kind}_loss"] = float(loss)
        r[f"{kind}_loss_diff"] = abs(float(loss) - float(ref[kind][0]))
        r[f"{kind}_param_diff"] = max_diff(params, ref[kind][1][0])
        r[f"{kind}_param_change"] = max_diff(params, params_host)
        if model_state:  # router biases: moved by the step, by the same amount
          r[f"{kind}_model_state_diff"] = max_diff(new_model_state, ref[kind][1][1])
          r[f"{kind}_model_state_change"] = max_diff(new_model_state, model_state)
        r[f"{kind}_layout_errors"] = layout_errors(state.params, params, table, mesh, "params")
        mu = state.opt_state[1][0].mu  # optax.chain(clip, adamw): adamw's Adam moments
        r[f"{kind}_opt_layout_errors"] = layout_errors(mu, params, table, mesh, "adam_mu")
      if "sample" in run:
        s, s_ref = got["sample"], ref["sample"]
        r["sample_tokens_equal"] = bool(np.array_equal(s.tokens, s_ref.tokens))
        r["sample_logprob_diff"] = float(np.max(np.abs(s.logprobs - s_ref.logprobs)))
        r["sample_lengths"] = s.lengths.tolist()
      results[f"{case_name}:{json.dumps(axes, sort_keys=True)}"] = r
  print("MESH_EQUIVALENCE " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main([tuple(x) for x in json.loads(sys.argv[1])], json.loads(sys.argv[2]))

"""One process of a multi-host micro GRPO run, for tests/test_multihost.py.

  JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/multihost_driver.py {step|loop} WORKDIR TOKENIZER_MODEL OUT_DIR

The mesh is (data 2, fsdp 2, tensor 2) over the 8 devices of both processes.
`step`: one GRPO step built from the library pieces the loop uses (sampler on
the sharded params, rewards scored per host and gathered, per-host batch,
jitted step), the evaluation runner's sampling on the updated params, then an
orbax save and restore of the state by both processes.
`loop`: the real `grpo.train` loop with the KL term (reference model on the
same mesh): 1 step and a checkpoint, then the loop is started again for 2
steps, so it restores step 1 and runs step 2.
Process 0 writes the results (params gathered from both processes) to
OUT_DIR/result.npz; each process writes OUT_DIR/process_<i>.json. The test
runs the same functions in its own single-device process to compare.
"""

import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def varied_reward(prompt, completion, reference):
  """Differs between completions, so advantages (and updates) are not 0."""
  return float(len(completion) % 3)


def _config():
  spec = importlib.util.spec_from_file_location("r1_zero_config",
                                                os.path.join(REPO, "configs", "r1_zero.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.grpo.update(num_steps=1, prompts_per_step=2, num_generations=4, max_new_tokens=8,
                log_samples_every=1, eval_every=0)
  c.train.update(checkpoint_every=1, progress_bar=False)
  c.optim.update(learning_rate=0.05, warmup_steps=0)
  return c


def _model_and_params(tok, mesh):
  """A 1-layer model (sizes divisible by the tensor axis) and its params, drawn on
  the host and placed straight into their shardings: every process draws the
  same numbers and feeds only its own devices (no init compile either)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from r1jax.models.config import ModelConfig
  from r1jax.models.transformer import Transformer
  from r1jax.parallel.mesh import logical_shardings

  model = Transformer(ModelConfig(
      vocab_size=-(-tok.vocab_size // 8) * 8, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=512))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  shardings = nn.unbox(logical_shardings(boxed["params"], mesh))
  rng = np.random.default_rng(0)
  fill = lambda path, x: (rng.normal(0.0, 0.1, x.shape) + (path[-1].key == "scale")
                          ).astype(x.dtype)  # norm scales 1 + noise
  host = jax.tree_util.tree_map_with_path(fill, nn.unbox(boxed["params"]))
  return model, jax.device_put(host, shardings)


def run_step(mesh, tok, workdir: str) -> dict:
  """One GRPO step + checkpoint save/restore; returns NumPy results (on every process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from r1jax.checkpoint.manager import Checkpointer, abstract_like
  from r1jax.data.templates import r1_zero_prompt
  from r1jax.parallel import distributed
  from r1jax.parallel.mesh import batch_sharding, mesh_rules
  from r1jax.rewards import RewardRunner
  from r1jax.sampling.sampler import SamplingConfig, sample
  from r1jax.trainers import grpo
  from r1jax.trainers.optim import make_optimizer
  from r1jax.trainers.sft import jit_train_step
  from r1jax.trainers.state import create_train_state

  c = _config()
  gc, G = c.grpo, c.grpo.num_generations
  model, params = _model_and_params(tok, mesh)
  before = distributed.fetch(params)  # the step donates them
  tx = make_optimizer(c.optim, 1)
  state, shardings = create_train_state(model, tx, mesh, c.seed, init_params=params)
  problems = grpo.step_problems(gc, c.seed, 0)
  texts = [r1_zero_prompt(p.question) for p in problems]
  prompts = [tok.encode(t) for t in texts]
  sc = SamplingConfig(max_new_tokens=gc.max_new_tokens, temperature=1.0, num_samples=G,
                      stop_token_ids=(tok.piece_to_id("</answer>"),))
  out = distributed.fetch(sample(model, state.params, prompts, jax.random.key(7), sc,
                                 eos_id=tok.eos_id, pad_id=tok.pad_id))
  completions = [tok.decode(t[:n].tolist()) for t, n in zip(out.tokens, out.lengths)]
  runner = RewardRunner({"varied": (varied_reward, 1.0)}, workers=0)
  total_N, _, stats = distributed.score_on_hosts(
      runner, [t for t in texts for _ in range(G)], completions,
      [p.answer for p in problems for _ in range(G)])
  advantages = np.asarray(grpo.group_advantages(jnp.asarray(total_N.reshape(-1, G)))).reshape(-1)
  host = grpo.build_batch(prompts, G, out.tokens, out.logprobs, out.lengths, out.finished,
                          advantages, pad_id=tok.pad_id)
  batch = distributed.shard_batch(host, batch_sharding(mesh))
  step_fn = lambda s, b: grpo.grpo_train_step(s, b, model=model, loss=grpo.make_loss(gc), tx=tx,
                                              temperature=1.0)
  with mesh_rules(mesh):
    state, metrics = jit_train_step(step_fn, shardings, mesh)(state, batch)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(1, state, {"grpo_step": 1}, force=True)
  ckpt.close()
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  restored, meta = ckpt.restore(abstract_like(state))
  ckpt.close()
  saved, loaded = distributed.fetch((state, restored))  # the whole state: params, Adam, step
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded)))
  params = saved.params
  q = restored.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  rows = distributed.process_rows(len(host["tokens"]), batch_sharding(mesh))
  # Held-out evaluation on the updated, sharded params (output rows on both hosts).
  from r1jax.eval.runner import generate
  ec = c.eval.copy_and_resolve_references()
  ec.update(num_samples=2, batch_size=2, max_new_tokens=8)
  sampled, greedy = generate(model, state.params, tok, prompts[:2], ec, jax.random.key(11))
  loss, grad_norm = distributed.fetch((metrics["loss"], metrics["grad_norm"]))
  change = max(float(np.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(before)))
  return dict(params=params, loss=float(loss), grad_norm=float(grad_norm), param_change=change,
              tokens=out.tokens, rewards=total_N, reward_mean=stats["rewards/varied/mean"],
              restored_equal=same, meta_step=meta["grpo_step"],
              restored_q_spec=str(q.sharding.spec),
              restored_q_local_shards=len(q.addressable_shards),
              process_rows=[rows.start, rows.stop],
              eval_completions=[t for t, _ in sampled + greedy])


def run_loop(mesh, tok, workdir: str) -> dict:
  """The grpo.train loop: 1 step + checkpoint, then restarted for 2 steps (resume)."""
  import jax
  import jax.numpy as jnp
  from r1jax.parallel import distributed
  from r1jax.trainers import grpo
  from r1jax.trainers.metrics import read_metrics
  from r1jax.trainers.optim import make_optimizer

  c = _config()
  c.grpo.beta = 0.04  # the reference model shares the mesh (and the checkpoint)
  model, params = _model_and_params(tok, mesh)
  tx = make_optimizer(c.optim, 2)  # constant rate: the same optimizer for both legs
  rewards = {"varied": (varied_reward, 1.0)}
  fresh = lambda: jax.tree.map(jnp.copy, params)  # the loop donates the state it is given
  grpo.train(c, workdir, model=model, tokenizer=tok, mesh=mesh, tx=tx, init_params=fresh(),
             rewards=rewards)
  c.grpo.num_steps = 2
  state = grpo.train(c, workdir, model=model, tokenizer=tok, mesh=mesh, tx=tx,
                     init_params=fresh(), rewards=rewards)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rows = read_metrics(metrics_path) if distributed.is_main_process() else []
  return dict(params=distributed.fetch(state.params), step=int(state.step),
              losses=[r["loss"] for r in rows], rewards=[r["reward"] for r in rows],
              checkpoints=sorted(os.listdir(os.path.join(workdir, "checkpoints"))))


def flatten(result: dict) -> dict:
  """{name: array} with params flattened by key path (for npz)."""
  import jax
  out = {k: v for k, v in result.items() if k != "params"}
  for path, leaf in jax.tree_util.tree_flatten_with_path(result["params"])[0]:
    out["params" + jax.tree_util.keystr(path)] = leaf
  return out


def main(mode: str, workdir: str, tokenizer_path: str, out_dir: str):
  from r1jax.parallel import distributed
  multi = distributed.initialize()  # from the JAX_* environment

  import jax
  import numpy as np
  from r1jax.data.tokenizer import load_tokenizer
  from r1jax.parallel.mesh import make_mesh

  mesh = make_mesh(MESH)
  tok = load_tokenizer(tokenizer_path)
  result = (run_step if mode == "step" else run_loop)(mesh, tok, workdir)
  seen = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              local_devices=jax.local_device_count(), global_devices=jax.device_count())
  seen.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, list))})
  with open(os.path.join(out_dir, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(seen, f)
  if distributed.is_main_process():
    np.savez(os.path.join(out_dir, "result.npz"), **flatten(result))
  if multi:
    jax.distributed.shutdown()
  print("MULTIHOST_DRIVER_OK", jax.process_index(), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:5])

"""Step 2 of the recipe in the tiny world: R1-Zero, GRPO with rule rewards
straight from the pretrained base.

base (pretrained here unless `config.base_workdir` names one) -> evaluate
`before` -> GRPO -> evaluate `after` -> WORKDIR/results.json.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.data import tinyworld
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError
from r1jax.eval.runner import evaluate, write_results
from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer, count_params
from r1jax.parallel.mesh import make_mesh
from r1jax.stages import pretrain
from r1jax.trainers import grpo
from r1jax.trainers.optim import make_optimizer
from r1jax.trainers.state import create_train_state


def base_params(config: ml_collections.ConfigDict, base_dir: str, model, mesh):
  """The params of the base's latest checkpoint, restored onto `mesh`."""
  pc = config.pretrain
  # The optimizer only fixes the checkpoint's tree structure, so the pretrain
  # config's optimizer section is enough; a fresh (tiny) state gives the
  # shapes and shardings to restore into.
  tx = make_optimizer(pc.optim, pc.train.num_steps)
  template, _ = create_train_state(model, tx, mesh, pc.seed)
  ckpt = Checkpointer(os.path.join(base_dir, "checkpoints"))
  try:
    state, _ = ckpt.restore(abstract_like(template))
  finally:
    ckpt.close()
  return state.params


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  base_dir = config.base_workdir or os.path.join(workdir, "base")
  if not config.base_workdir and not os.path.exists(os.path.join(base_dir, "results.json")):
    os.makedirs(base_dir, exist_ok=True)
    pretrain.run(config.pretrain, base_dir)
  tok_path = os.path.join(base_dir, "tokenizer.model")
  if not os.path.exists(tok_path):
    raise ConfigError(f"base_workdir {base_dir} has no tokenizer.model; pretrain it first")
  tok = load_tokenizer(tok_path)
  t_base = time.perf_counter() - t0

  model = Transformer(ModelConfig(**config.model))
  mesh = make_mesh(dict(config.mesh))
  params = base_params(config, base_dir, model, mesh)

  ec = config.eval
  problems = tinyworld.generate_problems("heldout", ec.num_problems, ec.seed, tuple(ec.levels))

  def eval_at(name, p):
    path = os.path.join(workdir, f"eval_samples_{name}.jsonl")
    if os.path.exists(path):
      os.replace(path, path + ".prev")  # keep, never silently drop
    return evaluate(model, p, tok, problems, r1_zero_prompt, ec, jax.random.key(ec.seed),
                    samples_path=path)

  before = eval_at("before", params)
  t1 = time.perf_counter()
  tx = make_optimizer(config.optim, config.grpo.num_steps * config.grpo.updates_per_rollout)
  state = grpo.train(config, workdir, model=model, tokenizer=tok, mesh=mesh, tx=tx,
                     init_params=params)
  t_train = time.perf_counter() - t1
  after = eval_at("after", state.params)
  results = dict(
      stage="r1_zero", before=before, after=after, grpo_steps=config.grpo.num_steps,
      optimizer_steps=int(state.step), num_params=count_params(state.params),
      base_workdir=base_dir,
      seconds=dict(base=round(t_base, 1), grpo=round(t_train, 1),
                   total=round(time.perf_counter() - t0, 1)))
  write_results(workdir, results)
  return results

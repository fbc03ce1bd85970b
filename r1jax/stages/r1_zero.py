"""Step 2 of the recipe in the tiny world: R1-Zero, GRPO with rule rewards
straight from the pretrained base.

base (pretrained here unless `config.base_workdir` names one) -> evaluate
`before` -> GRPO -> evaluate `after` -> WORKDIR/results.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.data import datasets, tinyworld
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError
from r1jax.eval.runner import evaluate, write_results
from r1jax.models.build import build_model
from r1jax.models.transformer import count_params
from r1jax.parallel.mesh import make_mesh
from r1jax.stages import pretrain
from r1jax.trainers import grpo
from r1jax.trainers.optim import make_optimizer
from r1jax.trainers.state import create_train_state


def base_params(config: ml_collections.ConfigDict, base_dir: str, model, mesh):
  """The params and model state (MoE router biases; {} for the dense model) of
  the base's latest checkpoint, restored onto `mesh`."""
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
  return state.params, state.model_state


def base_evaluation(config: ml_collections.ConfigDict, base_dir: str) -> dict | None:
  """The base's own held-out evaluation, when it is exactly the one we would run.

  The pretrain stage evaluates its final params; if its eval config equals
  ours, `before` is that evaluation (same problems, keys and figures) and is
  not recomputed.
  """
  try:
    with open(os.path.join(base_dir, "config.json")) as f:
      base_eval = json.load(f)["eval"]
    with open(os.path.join(base_dir, "results.json")) as f:
      results = json.load(f)
  except (OSError, KeyError, ValueError):
    return None
  if base_eval != json.loads(config.eval.to_json_best_effort()) or "pass@1" not in results:
    return None
  return {k: v for k, v in results.items() if k not in pretrain.RUN_KEYS}


DYNAMICS_KEYS = ("completions/length/mean", "completions/length/p50", "completions/length/p90",
                 "reflection/rate", "reflection/changed_answer_rate", "reward")


def dynamics_by_step(metrics_path: str) -> dict:
  """{"step": [...], key: [...]} of the self-evolution metrics, one entry per logged step."""
  from r1jax.trainers.metrics import read_metrics
  rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
  keys = [k for k in DYNAMICS_KEYS if any(k in r for r in rows)]
  keys += sorted({k for r in rows for k in r if k.startswith("completions/length/level_")
                  and k.endswith("/mean")})
  return {"step": [r["step"] for r in rows], **{k: [r.get(k) for r in rows] for k in keys}}


def pretrain_base(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The base's directory: `base_workdir`, or WORKDIR/base pretrained with
  `config.pretrain` unless its results.json is there already."""
  if config.base_workdir:
    return config.base_workdir
  base_dir = os.path.join(workdir, "base")
  if not os.path.exists(os.path.join(base_dir, "results.json")):
    os.makedirs(base_dir, exist_ok=True)
    with open(os.path.join(base_dir, "config.json"), "w") as f:
      f.write(config.pretrain.to_json_best_effort(indent=2))
    pretrain.run(config.pretrain, base_dir)
  return base_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  if config.grpo.get("train_file"):  # a bad task file fails now, not after pretraining
    datasets.load_problems(config.grpo.train_file, data_dir=config.grpo.get("data_dir") or None,
                           on_error=config.grpo.get("on_bad_line", "raise"))
  base_dir = pretrain_base(config, workdir)
  tok_path = os.path.join(base_dir, "tokenizer.model")
  if not os.path.exists(tok_path):
    raise ConfigError(f"base_workdir {base_dir} has no tokenizer.model; pretrain it first")
  tok = load_tokenizer(tok_path)
  t_base = time.perf_counter() - t0

  model = build_model(config.model)
  mesh = make_mesh(dict(config.mesh))
  params, model_state = base_params(config, base_dir, model, mesh)

  ec = config.eval
  problems = tinyworld.generate_problems("heldout", ec.num_problems, ec.seed, tuple(ec.levels))

  def eval_at(name, p, subset=None, model_state=model_state):
    path = None
    if name:
      path = os.path.join(workdir, f"eval_samples_{name}.jsonl")
      if os.path.exists(path):
        os.replace(path, path + ".prev")  # keep, never silently drop
    return evaluate(model, p, tok, problems[:subset], r1_zero_prompt, ec,
                    jax.random.key(ec.seed), samples_path=path, model_state=model_state)

  before = base_evaluation(config, base_dir)
  if before is None:
    before = eval_at("before", params)
  else:  # the base's samples are its eval_samples.jsonl
    before["source"] = os.path.join(base_dir, "results.json")

  def periodic_eval(p, state):  # the first eval_num_problems held-out problems
    r = eval_at(None, p, config.grpo.eval_num_problems, state)
    return {k: v for k, v in r.items() if isinstance(v, float)}

  t1 = time.perf_counter()
  tx = make_optimizer(config.optim, config.grpo.num_steps * grpo.updates_per_step(config.grpo))
  state = grpo.train(config, workdir, model=model, tokenizer=tok, mesh=mesh, tx=tx,
                     init_params=params, evaluate_fn=periodic_eval,
                     init_model_state=model_state)
  t_train = time.perf_counter() - t1
  after = eval_at("after", state.params, model_state=state.model_state)
  results = dict(
      stage="r1_zero", before=before, after=after, grpo_steps=config.grpo.num_steps,
      optimizer_steps=int(state.step), num_params=count_params(state.params),
      base_workdir=base_dir, dynamics=dynamics_by_step(os.path.join(workdir, "metrics.jsonl")),
      seconds=dict(base=round(t_base, 1), grpo=round(t_train, 1),
                   total=round(time.perf_counter() - t0, 1)))
  write_results(workdir, results)
  return results

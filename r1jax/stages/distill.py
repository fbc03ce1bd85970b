"""Distillation (configs/distill.py): a smaller student learns from R1's outputs.

student base (pretrained here unless `student_base_workdir` names one, with
the teacher's tokenizer) -> evaluate `before` -> SFT on the teacher's
rejection-sampled data (`distill.method=sequence`, the paper's method) or
token-level KD to the teacher's logits on the same data (`token`) ->
evaluate `after` -> WORKDIR/results.json.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import jax
import ml_collections
import optax

from r1jax.data import rejection, tinyworld
from r1jax.data.packing import PackedDataset, pack_examples
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError
from r1jax.eval.runner import evaluate, write_results
from r1jax.losses.distill import TokenKDLoss
from r1jax.models.build import build_model
from r1jax.models.transformer import count_params
from r1jax.parallel.mesh import make_mesh
from r1jax.stages import pretrain, r1, r1_zero
from r1jax.trainers import distill, sft
from r1jax.trainers.optim import make_optimizer
from r1jax.trainers.state import create_train_state

METHODS = ("sequence", "token")


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def teacher_tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """The tokenizer the teacher was trained with: its R1-Zero run's base's."""
  if config.student_base_workdir:
    return os.path.join(config.student_base_workdir, "tokenizer.model")
  try:
    zdir = _read_json(os.path.join(config.teacher_workdir, "results.json"))["r1_zero_workdir"]
    base = _read_json(os.path.join(zdir, "results.json"))["base_workdir"]
  except (OSError, KeyError, ValueError) as e:
    raise ConfigError(f"teacher_workdir={config.teacher_workdir!r} is not a finished configs/r1.py "
                      f"run (results.json naming its r1_zero_workdir and base): {e}") from e
  return os.path.join(base, "tokenizer.model")


def data_path(config: ml_collections.ConfigDict) -> str:
  if config.data_file:
    return config.data_file
  if not config.teacher_workdir:
    raise ConfigError("distill needs teacher_workdir (a configs/r1.py run) or data_file")
  return os.path.join(config.teacher_workdir, "rejection_sft", "data", "data.jsonl")


def student_base(config: ml_collections.ConfigDict, workdir: str,
                 tokenizer: str | None = None) -> str:
  """The student base's directory, pretraining it when needed with `tokenizer`
  (a tokenizer.model path; None = the teacher's)."""
  if config.student_base_workdir:
    return config.student_base_workdir
  base_dir = os.path.join(workdir, "student_base")
  if not os.path.exists(os.path.join(base_dir, "results.json")):
    os.makedirs(base_dir, exist_ok=True)
    tok = tokenizer or teacher_tokenizer_path(config)
    for suffix in (".model", ".vocab"):  # pretrain reuses WORKDIR/tokenizer.model when present
      if os.path.exists(tok[:-len(".model")] + suffix):
        shutil.copyfile(tok[:-len(".model")] + suffix,
                        os.path.join(base_dir, "tokenizer" + suffix))
    with open(os.path.join(base_dir, "config.json"), "w") as f:
      f.write(config.pretrain.to_json_best_effort(indent=2))
    pretrain.run(config.pretrain, base_dir)
  return base_dir


def restore(model, run_dir: str, mesh, seed: int = 0):
  """(params, model state) of the latest checkpoint of any run (pretrain, SFT,
  GRPO) of `model`, onto `mesh`; the optimizer state is never read."""
  template, _ = create_train_state(model, optax.sgd(0.0), mesh, seed)
  return r1.load_params(run_dir, template.params, template.model_state)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  dc = config.distill
  if dc.method not in METHODS:
    raise ConfigError(f"distill.method={dc.method!r}: expected one of {METHODS}")
  rows = rejection.read_dataset(data_path(config))  # bad data fails before any training
  examples = [(r["prompt"], r["completion"]) for r in rows]
  base_dir = student_base(config, workdir)
  tok = load_tokenizer(os.path.join(base_dir, "tokenizer.model"))
  model = build_model(config.model)
  mesh = make_mesh(dict(config.mesh))
  params, model_state = restore(model, base_dir, mesh)
  t_base = time.perf_counter() - t0

  ec = config.eval
  problems = tinyworld.generate_problems("heldout", ec.num_problems, ec.seed, tuple(ec.levels))

  def eval_at(name, p, s):
    path = os.path.join(workdir, f"eval_samples_{name}.jsonl")
    if os.path.exists(path):
      os.replace(path, path + ".prev")
    return evaluate(model, p, tok, problems, r1_zero_prompt, ec, jax.random.key(ec.seed),
                    samples_path=path, model_state=s)

  before = r1_zero.base_evaluation(config, base_dir)
  before = eval_at("before", params, model_state) if before is None else before

  packed = pack_examples(tok, examples, config.sft.seq_len)
  dataset = PackedDataset(packed, config.sft.batch_size, config.seed)
  num_steps = config.sft.num_steps
  if config.sft.get("num_epochs", 0):
    num_steps = max(1, int(config.sft.num_epochs * dataset.num_rows // config.sft.batch_size))
  tc = config.copy_and_resolve_references()
  tc.train.num_steps = num_steps
  tx = make_optimizer(config.optim, num_steps)
  step_fn, step_args = None, ()
  if dc.method == "token":
    teacher_model = build_model(config.teacher_model)
    teacher_params, teacher_state = restore(
        teacher_model, os.path.join(config.teacher_workdir, config.teacher_stage), mesh)
    if teacher_model.config.vocab_size != model.config.vocab_size:
      raise ConfigError(f"token-level KD needs one vocabulary: teacher {teacher_model.config.vocab_size}"
                        f" vs student {model.config.vocab_size}")
    step_fn = functools.partial(
        distill.kd_train_step, model=model, teacher_model=teacher_model, tx=tx,
        loss=TokenKDLoss(temperature=dc.temperature, direction=dc.direction),
        kd_weight=dc.kd_weight)
    step_args = (teacher_params, teacher_state)
  t1 = time.perf_counter()
  state = sft.train(tc, workdir, model=model, dataset=dataset, mesh=mesh, tx=tx,
                    init_params=params, init_model_state=model_state, step_fn=step_fn,
                    step_args=step_args)
  t_train = time.perf_counter() - t1
  after = eval_at("after", state.params, state.model_state)
  results = dict(stage="distill", method=dc.method, before=before, after=after,
                 data=dict(path=data_path(config), examples=len(examples),
                           reasoning=sum(r.get("kind") == "reasoning" for r in rows),
                           packed_rows=dataset.num_rows),
                 sft_steps=num_steps, num_params=count_params(state.params),
                 student_base_workdir=base_dir,
                 seconds=dict(base=round(t_base, 1), train=round(t_train, 1),
                              total=round(time.perf_counter() - t0, 1)))
  write_results(workdir, results)
  return results

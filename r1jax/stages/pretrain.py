"""Step 1 of the recipe in the tiny world: pretrain the base model.

tokenizer (trained on the corpus) -> packed corpus -> SFT loop -> held-out
evaluation with the R1-Zero template -> WORKDIR/results.json.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from r1jax.data import tinyworld
from r1jax.data.packing import PackedDataset, pack_documents
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tokenizer import load_tokenizer, train_sentencepiece
from r1jax.errors import ConfigError
from r1jax.eval.runner import evaluate, write_results
from r1jax.models.build import build_model
from r1jax.models.transformer import count_params
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import sft
from r1jax.trainers.optim import make_optimizer


# What pretrain.run adds to the evaluation figures in results.json.
RUN_KEYS = ("stage", "step", "num_params", "corpus_docs", "packed_rows", "train_tokens", "seconds")


def corpus(dc: ml_collections.ConfigDict) -> list[str]:
  return tinyworld.pretraining_corpus(
      dc.num_docs, dc.corpus_seed, levels=tuple(dc.levels), plain_fraction=dc.plain_fraction,
      malformed_fraction=dc.malformed_fraction, direct_fraction=dc.direct_fraction,
      drill_fraction=dc.drill_fraction,
      self_correct_fraction=dc.get("self_correct_fraction", 0.0),
      question_language_fraction=dc.get("question_language_fraction", 0.0))


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str, docs: list[str]):
  """WORKDIR/tokenizer.model, trained on the corpus the first time."""
  path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    # Trained under a temporary name: a run killed meanwhile never leaves a
    # truncated tokenizer.model that the restart would take as done.
    tmp = train_sentencepiece(docs[:config.tokenizer.num_docs], path[:-len(".model")] + ".tmp",
                              vocab_size=config.tokenizer.vocab_size, seed=config.seed)
    os.replace(tmp[:-len(".model")] + ".vocab", path[:-len(".model")] + ".vocab")
    os.replace(tmp, path)
  tok = load_tokenizer(path)
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError(f"tokenizer {path} has {tok.vocab_size} pieces but "
                      f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size")
  return tok


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  docs = corpus(config.data)
  tok = tokenizer_for(config, workdir, docs)
  packed = pack_documents([tok.encode(d) for d in docs], config.data.seq_len,
                          bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  dataset = PackedDataset(packed, config.data.batch_size, config.seed)
  t_data = time.perf_counter() - t0

  model = build_model(config.model)
  mesh = make_mesh(dict(config.mesh))
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = sft.train(config, workdir, model=model, dataset=dataset, mesh=mesh, tx=tx)
  t_train = time.perf_counter() - t0 - t_data

  ec = config.eval
  problems = tinyworld.generate_problems("heldout", ec.num_problems, ec.seed, tuple(ec.levels))
  samples_path = os.path.join(workdir, "eval_samples.jsonl")
  if os.path.exists(samples_path):
    os.replace(samples_path, samples_path + ".prev")  # keep, never silently drop
  results = evaluate(model, state.params, tok, problems, r1_zero_prompt, ec,
                     jax.random.key(ec.seed), samples_path=samples_path,
                     model_state=state.model_state)
  results.update(
      stage="pretrain", step=int(state.step), num_params=count_params(state.params),
      corpus_docs=len(docs), packed_rows=int(dataset.num_rows),
      train_tokens=int(dataset.tokens_per_batch * int(state.step)),
      seconds=dict(data=round(t_data, 1), train=round(t_train, 1),
                   eval=round(time.perf_counter() - t0 - t_data - t_train, 1)))
  write_results(workdir, results)
  return results

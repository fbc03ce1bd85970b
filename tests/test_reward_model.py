"""The reward model (R1 stage 4) on a micro backbone: zero head scores all
answers alike, Bradley–Terry training learns a tiny-world preference (a
summary that states the answer) and ranks held-out pairs, resume is exact,
bad pair files are named by file:line and field."""

import json
import random
import shutil

import jax
import ml_collections
import numpy as np
import optax
import pytest

from r1jax.data import tinyworld
from r1jax.data.templates import r1_zero_prompt
from r1jax.models.config import ModelConfig
from r1jax.models.reward_model import RewardModel, init_from_policy
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import reward_model as rm
from r1jax.trainers.state import create_train_state
from tests.test_grpo_trainer import micro_tokenizer  # noqa: F401 (fixture)


def _pairs(split, n, seed):
  """chosen: the answer block restates the answer in words; rejected: a bare answer."""
  rng = random.Random(seed)
  out = []
  for p in tinyworld.generate_problems(split, n, seed, (1, 2)):
    mode = rng.choice(tinyworld.LANGS)
    cot = tinyworld.solution_text(p, mode, rng)
    summary = "so the answer is" if mode == "en" else "ergo responsum est"
    out.append(rm.Pair(r1_zero_prompt(p.question),
                       f" <think> {cot} </think> <answer> {summary} {p.answer} </answer>",
                       f" <think> {cot} </think> <answer> {p.answer} </answer>"))
  return out


def _config(steps):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.name = "rm-test"
  c.rm = ml_collections.ConfigDict(dict(batch_size=16, max_length=160, margin=0.0))
  c.train = ml_collections.ConfigDict(dict(num_steps=steps, log_every=10, checkpoint_every=15,
                                           keep_checkpoints=2, progress_bar=False))
  return c


@pytest.fixture(scope="module")
def setup(micro_tokenizer):
  tok = micro_tokenizer
  backbone = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     max_position_embeddings=512))
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  policy, _ = create_train_state(backbone, optax.sgd(0.0), mesh, seed=0)
  return tok, RewardModel(backbone), mesh, init_from_policy(policy.params, 32)


def test_reward_model_learns_a_preference_and_ranks_heldout_pairs(setup, tmp_path):
  tok, model, mesh, init = setup
  train, heldout = _pairs("train", 256, 0), _pairs("heldout", 64, 1)
  held = rm.pair_arrays(tok, heldout, 160)
  assert rm.pair_accuracy(model, init, held) == 0.0  # zero head: ties, never "right"
  tx = optax.adam(3e-3)
  state = rm.train(_config(30), str(tmp_path), model=model, tokenizer=tok, pairs=train,
                   mesh=mesh, tx=tx, init_params=init)
  acc = rm.pair_accuracy(model, state.params, held)
  assert acc >= 0.9, acc
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"]
  # The scorer GRPO uses agrees with the pair ranking.
  scorer = rm.RewardModelScorer(model, state.params, tok, max_length=160, batch_size=16)
  s_c = scorer.score([p.prompt for p in heldout], [p.chosen for p in heldout])
  s_r = scorer.score([p.prompt for p in heldout], [p.rejected for p in heldout])
  assert s_c.shape == (64,) and np.mean(s_c > s_r) == acc
  # Resume: continuing from the straight run's step-15 checkpoint ends where it did.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "checkpoints" / "15", resumed / "checkpoints" / "15")
  again = rm.train(_config(30), str(resumed), model=model, tokenizer=tok, pairs=train,
                   mesh=mesh, tx=tx, init_params=init)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_pair_files_name_file_line_and_field(tmp_path):
  good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
  for lines, needle in (([good, "{oops"], ":2: invalid JSON"),
                        ([good, json.dumps({"prompt": "p", "chosen": "a"})],
                         ":2: field 'rejected' missing"),
                        ([json.dumps(["p"])], ":1: expected a JSON object")):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=needle):
      rm.load_pairs(str(path))
  path.write_text(good + "\n")
  assert rm.load_pairs(str(path)) == [rm.Pair("p", "a", "b")]

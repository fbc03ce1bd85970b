"""GRPO loop guards on a micro model: a NaN gradient at one step is skipped,
logged with its step and batch and counted; an all-equal-reward step is logged,
not an error; a jsonl task file with bad lines and over-long prompts trains
(skipped/truncated and counted); rows a killed run wrote after its last
checkpoint are dropped on resume."""

import json
import logging

import jax
import numpy as np
import pytest

from r1jax.trainers import grpo
from r1jax.trainers.metrics import truncate_jsonl
from tests.test_grpo_trainer import _micro_train, _varied, micro_tokenizer  # noqa: F401 (fixture)


def _poison(monkeypatch, steps):
  """NaN advantages (so NaN loss and gradients) in the batches of the given GRPO steps."""
  built = []
  original = grpo.build_batch

  def poisoned(*args, **kwargs):
    batch = original(*args, **kwargs)
    built.append(1)
    if len(built) in steps:
      batch["advantages"] = np.full_like(batch["advantages"], np.nan)
    return batch

  monkeypatch.setattr(grpo, "build_batch", poisoned)


def test_nan_gradient_at_one_step_is_skipped_logged_and_counted(tmp_path, micro_tokenizer,
                                                                monkeypatch, caplog):
  _poison(monkeypatch, steps={2})
  caplog.set_level(logging.WARNING)
  state, rows = _micro_train(tmp_path, micro_tokenizer, rewards={"varied": (_varied, 1.0)},
                             num_steps=3)
  assert [r["step"] for r in rows] == [1, 2, 3]  # the run finished
  assert [r["skipped_updates"] for r in rows] == [0.0, 1.0, 0.0]
  assert rows[1]["loss"] is None and rows[2]["loss"] is not None  # NaN is logged as null
  assert int(state.nonfinite_run) == 0 and int(state.step) == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith(
      "GRPO step 2: non-finite loss or gradient in update 0 (epoch 0, mini-batch 0, problems tw")
  # (That a skipped update leaves params and Adam moments untouched is
  # tests/test_trainer.py::test_nonfinite_step_is_skipped_and_counted.)


def test_too_many_nonfinite_updates_in_a_row_stop_the_run(tmp_path, micro_tokenizer, monkeypatch):
  _poison(monkeypatch, steps={1, 2, 3, 4})
  from r1jax.trainers.sft import NonFiniteError
  with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite updates ending at GRPO "
                                           r"step 3 \(train.max_consecutive_nonfinite=2\)"):
    _micro_train(tmp_path, micro_tokenizer, rewards={"varied": (_varied, 1.0)}, num_steps=4,
                 train={"max_consecutive_nonfinite": 2})


def _constant(prompt, completion, reference):
  return 0.5


def _task_file(path, tokenizer):
  """Tiny-world problems as a jsonl task file, with a malformed line, an
  unverifiable gold answer and an over-long prompt; returns the prompt budget."""
  from r1jax.data import tinyworld
  from r1jax.data.templates import r1_zero_prompt
  problems = tinyworld.generate_problems("train", 6, 0, (1, 2))
  lines = [json.dumps({"question": p.question, "answer": p.answer, "id": p.uid}) for p in problems]
  lines.insert(2, '{"question": "compute 1 +')
  lines.insert(4, json.dumps({"question": "compute 2 + 2", "answer": "see above"}))
  lines.append(json.dumps({"question": " ".join(["compute 1 + 1"] * 200), "answer": "2"}))
  path.write_text("\n".join(lines) + "\n")
  return max(len(tokenizer.encode(r1_zero_prompt(p.question))) for p in problems) + 20


def test_all_equal_rewards_on_a_task_file_are_logged_not_an_error(tmp_path, micro_tokenizer,
                                                                  caplog):
  path = tmp_path / "task.jsonl"
  budget = _task_file(path, micro_tokenizer)
  caplog.set_level(logging.INFO)
  state, rows = _micro_train(tmp_path / "run", micro_tokenizer, rewards={"same": (_constant, 1.0)},
                             num_steps=1, train_file=str(path), on_bad_line="skip",
                             max_prompt_tokens=budget, overlong_prompts="skip")
  assert rows[0]["frac_reward_zero_std"] == 1.0 and rows[0]["reward"] == 0.5
  assert rows[0]["loss"] == 0.0 and rows[0]["skipped_updates"] == 0.0
  assert "GRPO step 1: every group's rewards are equal (mean 0.500)" in caplog.text
  assert f"task {path}: 6 problems (bad_gold 1, blank 0, kept 7, lines 9, malformed 1, " \
         "prompts_skipped 1)" in caplog.text
  assert int(state.step) == 1


def test_task_file_problems_prompts_and_errors(tmp_path, micro_tokenizer):
  import ml_collections
  path = tmp_path / "task.jsonl"
  budget = _task_file(path, micro_tokenizer)
  gc = lambda overlong: ml_collections.ConfigDict(dict(
      train_file=str(path), on_bad_line="skip", max_prompt_tokens=budget,
      overlong_prompts=overlong, max_new_tokens=8, prompts_per_step=2))
  task = grpo.load_task(gc("truncate_left"), micro_tokenizer, 512)
  assert len(task) == 7 and max(len(ids) for _, ids in task) == budget
  from r1jax.data.templates import r1_zero_prompt
  assert task[-1][1][-5:] == micro_tokenizer.encode(r1_zero_prompt("compute 1 + 1"))[-5:]
  assert len(grpo.load_task(gc("skip"), micro_tokenizer, 512)) == 6
  # Drawn as a pure function of (seed, step).
  assert grpo.step_problems(gc("skip"), 0, 5, task) == grpo.step_problems(gc("skip"), 0, 5, task)
  assert grpo.step_problems(gc("skip"), 0, 5, task) != grpo.step_problems(gc("skip"), 0, 6, task)
  # Strict: the malformed line stops the run before any work.
  from r1jax.data.jsonl import JsonlError
  with pytest.raises(JsonlError, match=f"{path}:3: invalid JSON"):
    _micro_train(tmp_path / "strict", micro_tokenizer, train_file=str(path))
  assert not (tmp_path / "strict").exists()


def test_rows_after_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
  path.write_text("\n".join(rows) + "\n" + '{"step": 5, "lo')  # torn by a kill
  assert truncate_jsonl(str(path), 2) == 3
  assert path.read_text() == "\n".join(rows[:2]) + "\n"
  assert truncate_jsonl(str(path), 2) == 0 and truncate_jsonl(str(tmp_path / "none"), 1) == 0

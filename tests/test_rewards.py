"""Rule rewards: accuracy on real gold answers, format, language, length, and the runner."""

import functools
import json
import multiprocessing
import os
import random
import time

import numpy as np
import pytest

from r1jax.rewards import accuracy
from r1jax.rewards.accuracy import accuracy_reward, accuracy_reward_fn, is_equivalent, parse_number
from r1jax.rewards.format import format_reward, format_reward_fn, tag_count_reward
from r1jax.rewards.language import infer_language, language_consistency_reward
from r1jax.rewards.length import overlong_penalty
from r1jax.rewards.runner import RewardRunner


def _golds(dataset: str, field_fn) -> list[str]:
  from tests.conftest import SHARED_DATA  # here, not at the top: spawned runner workers import this module
  path = os.path.join(SHARED_DATA, dataset, "test.jsonl")
  if not os.path.exists(path):
    pytest.skip(f"{path} not found")
  return [field_fn(json.loads(line)) for line in open(path)]


def _gsm8k():
  return _golds("gsm8k", lambda r: r["answer"].split("####")[-1].strip())


def _aime24():
  return _golds("aime24", lambda r: r["answer"])


def _amc23():
  return _golds("amc23", lambda r: str(r["answer"]))


def _written_forms(gold: str) -> list[str]:
  """The gold answer as a model might write it, in every supported format."""
  v = parse_number(gold)
  bodies = [gold.strip()]
  if v.denominator == 1:
    bodies.append(str(v.numerator))
    if abs(v) >= 1000:
      bodies.append(f"{v.numerator:,}")
  else:
    bodies.append(f"\\frac{{{v.numerator}}}{{{v.denominator}}}")
  forms = []
  for b in bodies:
    forms += [f"<think> so </think> <answer> {b} </answer>", f"so the answer is \\boxed{{{b}}}."]
  return forms


def _wrong(gold: str) -> list[str]:
  v = parse_number(gold)
  wrong = [v + 1] + ([2 * v] if v != 0 else [])
  return [str(w.numerator) if w.denominator == 1 else f"\\frac{{{w.numerator}}}{{{w.denominator}}}"
          for w in wrong]


def _check_golds(golds):
  for g in golds:
    for c in _written_forms(g):
      assert accuracy_reward_fn("", c, g) == 1.0, (g, c)
    for w in _wrong(g):
      assert accuracy_reward_fn("", f"<answer>{w}</answer>", g) == 0.0, (g, w)
      assert accuracy_reward_fn("", f"\\boxed{{{w}}}", g) == 0.0, (g, w)


def test_gsm8k_golds_all_rows_numeric_path():
  golds = _gsm8k()
  assert len(golds) == 1319
  _check_golds(golds)


@pytest.mark.parametrize("golds_fn,n", [(_aime24, 30), (_amc23, 40), (_gsm8k, 200)])
def test_math_verify_agrees_with_exact_check_on_real_golds(golds_fn, n):
  """math-verify alone (no exact-rational fast path) grades the written forms the same way."""
  golds = golds_fn()
  golds = random.Random(0).sample(golds, n) if len(golds) > n else golds
  assert len(golds) == n
  _check_golds(golds)
  for g in golds:
    for c in _written_forms(g):
      assert accuracy._math_verify_equal(accuracy.extract_answer(c), g), (g, c)
    for w in _wrong(g):
      assert not accuracy._math_verify_equal(w, g), (g, w)


@pytest.mark.parametrize("completion,gold,expected", [
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "0.5", 1.0),                     # nested braces
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("first \\boxed{3} then \\boxed{4}", "4", 1.0),                     # last wins
    ("first \\boxed{4} then \\boxed{3}", "4", 0.0),
    ("<answer>1</answer> and <answer>4</answer>", "4", 1.0),
    ("the answer is 4", "4", 0.0),                                      # nothing to extract
    ("\\boxed{4", "4", 0.0),                                            # unclosed box
    ("<answer></answer>", "4", 0.0),                                    # empty answer
    ("<answer>   </answer>", "0", 0.0),
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>\\sqrt{2}</answer>", "2^{1/2}", 1.0),                   # math-verify only
    ("<answer>\\sqrt{3}</answer>", "2^{1/2}", 0.0),
    ("<answer>\\pi/2</answer>", "\\frac{\\pi}{2}", 1.0),
    ("<answer>$1,234</answer>", "1234", 1.0),
    ("<answer>12 apples</answer>", "12", 1.0),
    ("<answer>3 or 4</answer>", "4", 0.0),                              # hedging earns nothing
    ("<answer>1, 2, 3, 4</answer>", "3", 0.0),
])
def test_accuracy_edge_cases(completion, gold, expected):
  assert accuracy_reward_fn("prompt", completion, gold) == expected


def test_accuracy_long_and_garbled_answers():
  for body in ["1" * 10_000, "x+" * 5_000, "\\frac{" * 2_000]:
    start = time.monotonic()
    assert accuracy_reward(f"<answer>{body}</answer>", "1") == 0.0
    assert time.monotonic() - start < 2.0
  garbled = b"<think>\xff\xfe ok</think><answer>\x80 3</answer>".decode("utf-8", errors="replace")
  assert accuracy_reward(garbled, "3") == 1.0  # replacement chars are ignored, the 3 is read
  assert format_reward(garbled) == 1.0
  ok = b"<think>\xff\xfe</think><answer>3</answer>".decode("utf-8", errors="replace")
  assert accuracy_reward(ok, "3") == 1.0
  assert is_equivalent("\\sqrt{2}", "2^{1/2}") and not is_equivalent("", "0")


def test_format_rewards():
  good = "<think> a </think>\n<answer> 3 </answer>"
  assert format_reward(good) == format_reward_fn("p", good, "3") == 1.0
  assert format_reward("<answer> 3 </answer> <think> a </think>") == 0.0   # out of order
  assert format_reward("<think> a </think> 3") == 0.0                      # missing tags
  assert tag_count_reward(good) == 1.0
  assert tag_count_reward("<answer> 3 </answer> <think> a </think>") == 1.0  # order is not its job
  assert tag_count_reward("<think> a </think> 3") == 0.5
  assert tag_count_reward("<think><think> a </think> <answer>3</answer>") == 0.75  # repeated tag earns 0
  assert tag_count_reward("") == 0.0


def test_language_consistency_hand_computed():
  # en words: we, then, value; la words: tum, est; "3", "+", tags carry no language.
  completion = "<think> we tum est then 3 + value </think> <answer> tum tum tum </answer>"
  assert language_consistency_reward("", completion, "", target_lang="en") == pytest.approx(3 / 5)
  assert language_consistency_reward("", completion, "", target_lang="la") == pytest.approx(2 / 5)
  no_think = "we tum tum"  # whole completion is the chain of thought
  assert language_consistency_reward("", no_think, "", target_lang="la") == pytest.approx(2 / 3)
  assert language_consistency_reward("", "<think> 3 + 4 </think>", "", target_lang="en") == 0.0
  assert infer_language("computa de valorem we 3") == "la"
  assert infer_language("we then computa") == "en"
  assert infer_language("3 + 4") is None
  assert language_consistency_reward("computa de valorem", completion, "", target_lang=None) == pytest.approx(2 / 5)
  with pytest.raises(ValueError):
    language_consistency_reward("", completion, "", target_lang="fr")


def test_overlong_penalty_hand_computed():
  pen = functools.partial(overlong_penalty, max_length=100, cache_length=20)
  assert [pen(n) for n in (0, 80, 81, 90, 99, 100, 101, 10_000)] == pytest.approx(
      [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
  with pytest.raises(ValueError):
    overlong_penalty(5, max_length=10, cache_length=0)


# Reward functions for the runner tests: top level so spawned workers can unpickle them.
def _raises(prompt, completion, reference):
  raise RuntimeError("reward crashed")


def _hangs_on_marker(prompt, completion, reference):
  if "HANG" in completion:
    time.sleep(60)
  return 1.0


_PROMPTS = ["p0", "p1", "p2", "p3"]
_COMPLETIONS = ["<think>a</think><answer>3</answer>", "\\boxed{4}",
                "<think>a</think><answer>5</answer>", "<answer>6</answer>"]
_REFS = ["3", "4", "7", "6"]
_ACC = np.array([1, 1, 0, 1], np.float32)
_FMT = np.array([1, 0, 1, 0], np.float32)


@pytest.mark.parametrize("workers", [0, 2])
def test_runner_weights_and_errors(workers):
  runner = RewardRunner({"accuracy": (accuracy_reward_fn, 1.0), "format": (format_reward_fn, 0.5),
                         "boom": (_raises, 3.0)}, timeout_s=5.0, workers=workers)
  try:
    total, per_fn, stats = runner.score(_PROMPTS, _COMPLETIONS, _REFS)
  finally:
    runner.close()
  np.testing.assert_array_equal(per_fn["accuracy"], _ACC)
  np.testing.assert_array_equal(per_fn["format"], _FMT)
  np.testing.assert_array_equal(per_fn["boom"], np.zeros(4))
  np.testing.assert_allclose(total, _ACC + 0.5 * _FMT)
  assert stats["rewards/boom/errors"] == 4 and stats["rewards/boom/timeouts"] == 0
  assert stats["rewards/accuracy/errors"] == stats["rewards/format/errors"] == 0
  assert stats["rewards/total/mean"] == pytest.approx(float(np.mean(_ACC + 0.5 * _FMT)))


def test_runner_timeout_kills_hung_worker_and_recovers():
  runner = RewardRunner({"hang": (_hangs_on_marker, 2.0), "accuracy": (accuracy_reward_fn, 1.0)},
                        timeout_s=1.0, workers=2)
  try:
    runner._pool = runner._start_pool()  # start-up is not what this test times
    completions = list(_COMPLETIONS)
    completions[1] = "HANG \\boxed{4}"
    completions[3] = "<answer>10^{10^{10}}</answer>"  # sympy really hangs on this one
    start = time.monotonic()
    total, per_fn, stats = runner.score(_PROMPTS, completions, _REFS)
    elapsed = time.monotonic() - start
    # Two timeouts of 1 s plus one pool rebuild each (spawn + sympy import), far below 60 s.
    assert elapsed < 20, elapsed
    np.testing.assert_array_equal(per_fn["hang"], [1, 0, 1, 1])
    np.testing.assert_array_equal(per_fn["accuracy"], [1, 1, 0, 0])
    np.testing.assert_allclose(total, [3, 1, 2, 2])
    assert stats["rewards/hang/timeouts"] == 1 and stats["rewards/hang/errors"] == 0
    assert stats["rewards/accuracy/timeouts"] == 1
    # The hung processes were killed, not left sleeping beside the new pool.
    assert len(multiprocessing.active_children()) <= 2
    total, per_fn, stats = runner.score(_PROMPTS, _COMPLETIONS, _REFS)  # next call still works
    np.testing.assert_array_equal(per_fn["accuracy"], _ACC)
    np.testing.assert_allclose(total, 2.0 + _ACC)
    assert stats["rewards/hang/timeouts"] == stats["rewards/accuracy/timeouts"] == 0
  finally:
    runner.close()

"""Answer checking, format rule, and the pass@k / cons@k arithmetic."""

import itertools
import json
import os
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from r1jax.eval.metrics import majority_vote, pass_at_k
from r1jax.rewards.accuracy import accuracy_reward, extract_answer, is_equivalent, parse_number
from r1jax.rewards.format import format_reward
from tests.conftest import SHARED_DATA


@pytest.mark.parametrize("answer,gold", [
    ("42", "42"), (" 42 ", "42"), ("1,234", "1234"), ("$5", "5"), ("5 dollars", "5"),
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{3}{4}", "0.75"), ("-3", "-3"),
    ("7.", "7"), ("025", "25"), ("1/3", "\\frac{1}{3}")])
def test_equivalent(answer, gold):
  assert is_equivalent(answer, gold)


@pytest.mark.parametrize("answer,gold", [
    ("43", "42"), ("0.33", "1/3"), ("", "1"), ("1234", "12345"), ("-3", "3"), ("x", "y")])
def test_not_equivalent(answer, gold):
  assert not is_equivalent(answer, gold)


def test_extraction_prefers_last_answer_tag_then_boxed():
  assert extract_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"
  assert extract_answer("so \\boxed{\\frac{1}{2}} and \\boxed{3}") == "3"
  assert extract_answer("nested \\boxed{\\frac{1}{\\sqrt{4}}}") == "\\frac{1}{\\sqrt{4}}"
  assert extract_answer("The answer is 7.") is None


def test_format_rule():
  assert format_reward(" <think> a . </think> <answer> 3 </answer>") == 1.0
  assert format_reward("<think>a</think><answer>3</answer>\n") == 1.0
  for bad in ["<think> a </think> 3", "<answer> 3 </answer>", "<think> a <answer> 3 </answer>",
              "<think> a </think> <answer> 3 </answer> extra",
              "<think> a </think> <think> b </think> <answer> 3 </answer>",
              "<answer> 3 </answer> <think> a </think>"]:
    assert format_reward(bad) == 0.0, bad


def test_pass_at_k_matches_brute_force():
  for n, c, k in [(5, 2, 1), (5, 2, 2), (6, 3, 4), (8, 0, 3), (8, 8, 8), (7, 1, 7)]:
    subsets = list(itertools.combinations(range(n), k))
    brute = np.mean([any(i < c for i in s) for s in subsets])
    assert pass_at_k(n, c, k) == pytest.approx(brute)
  assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    pass_at_k(3, 4, 1)


def test_majority_vote():
  assert majority_vote(["3", None, "4", "4", "3"]) == "3"  # tie -> first seen
  assert majority_vote(["1", "2", "2"]) == "2"
  assert majority_vote([None, None]) is None


def test_gsm8k_gold_answers_round_trip():
  """Every GSM8K test gold answer is graded right in both tags and \\boxed{}."""
  path = os.path.join(SHARED_DATA, "gsm8k", "test.jsonl")
  if not os.path.exists(path):
    pytest.skip("../shared/data is not beside the repo")
  golds = [json.loads(l)["answer"].split("####")[-1].strip() for l in open(path)]
  assert len(golds) == 1319
  for g in golds:
    assert accuracy_reward(f"<think> ... </think> <answer> {g} </answer>", g) == 1.0, g
    assert accuracy_reward(f"so \\boxed{{{g}}}", g) == 1.0, g
    value = parse_number(g)
    assert value is not None, g
    assert accuracy_reward(f"<answer>{value + 1}</answer>", g) == 0.0, g

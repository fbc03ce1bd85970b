"""Tests of the tiny world's task generator, languages and pretraining corpus."""

import ast
import collections
import random
import re

import pytest

from r1jax.data import tinyworld as tw
from r1jax.data.templates import R1_ZERO_TEMPLATE, r1_zero_prompt

_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
_PY_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _reference_steps(expression: str) -> list:
  """Solves `expression` with Python's own parser, post-order, as (op, a, b, r)."""
  steps = []

  def solve(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
      a, b = solve(node.left), solve(node.right)
      op = _AST_OPS[type(node.op)]
      steps.append((op, a, b, _PY_OPS[op](a, b)))
      return steps[-1][3]
    raise ValueError(f"unexpected syntax in {expression!r}: {ast.dump(node)}")

  solve(ast.parse(expression, mode="eval").body)
  return steps


@pytest.fixture(scope="module")
def train_problems():
  return tw.generate_problems("train", 6000, seed=0)


@pytest.fixture(scope="module")
def heldout_problems():
  return tw.generate_problems("heldout", 1000, seed=0)


@pytest.fixture(scope="module")
def problems(train_problems, heldout_problems):
  return train_problems + heldout_problems


@pytest.fixture(scope="module")
def corpus():
  return tw.pretraining_corpus(4000, seed=0)


# ----------------------------------------------------------------------------
# Problems.


def test_answers_and_steps_match_an_independent_evaluator(problems):
  for p in problems:
    steps = _reference_steps(p.expression)
    assert list(p.steps) == steps, p
    assert p.answer == str(eval(p.expression, {"__builtins__": {}})), p  # pylint: disable=eval-used
    assert p.level == len(p.steps) == sum(p.expression.count(op) for op in "+-*")


def test_values_obey_the_rules(problems):
  for p in problems:
    for op, a, b, r in p.steps:
      assert r == _PY_OPS[op](a, b), p
      assert 0 <= a <= tw.MAX_VALUE and 0 <= b <= tw.MAX_VALUE, p
      assert 0 <= r <= tw.MAX_VALUE, p
      if op == "*":
        assert min(a, b) <= tw.MAX_SMALL_FACTOR, p
    leaves = [int(x) for x in re.findall(r"\d+", p.expression)]
    assert all(1 <= x <= tw.MAX_LEAF for x in leaves), p


def test_every_level_and_operator_is_covered(problems):
  levels = collections.Counter(p.level for p in problems)
  assert set(levels) == set(tw.LEVELS)
  ops = collections.Counter(s[0] for p in problems for s in p.steps)
  total = sum(ops.values())
  for op in "+-*":  # no operator starved by the value rules
    assert ops[op] / total > 0.2, ops


def test_levels_are_balanced():
  problems = tw.generate_problems("train", 1003, seed=3)
  counts = collections.Counter(p.level for p in problems)
  assert sorted(counts.values()) == [250, 251, 251, 251]
  only_two = tw.generate_problems("heldout", 10, seed=3, levels=(2, 4))
  assert collections.Counter(p.level for p in only_two) == {2: 5, 4: 5}


def test_problems_are_distinct_within_a_call():
  problems = tw.generate_problems("train", 3000, seed=1, levels=(2, 3, 4))
  assert len({p.expression for p in problems}) == len(problems)
  assert len({p.uid for p in problems}) == len(problems)


def test_generation_is_deterministic():
  a = tw.generate_problems("train", 200, seed=7)
  assert a == tw.generate_problems("train", 200, seed=7)
  assert a != tw.generate_problems("train", 200, seed=8)


def test_splits_are_disjoint_and_follow_is_heldout(train_problems, heldout_problems):
  train, heldout = train_problems, heldout_problems
  assert not any(tw.is_heldout(p) for p in train)
  assert all(tw.is_heldout(p) for p in heldout)
  assert not {p.uid for p in train} & {p.uid for p in heldout}
  assert not {p.expression for p in train} & {p.expression for p in heldout}


def test_heldout_fraction_is_about_ten_percent():
  expressions = [f"{a} {op} {b}" for a in range(1, 61) for b in range(1, 61)
                 for op in "+-*"]
  fraction = sum(map(tw.is_heldout, expressions)) / len(expressions)
  assert 0.08 < fraction < 0.12, fraction


def test_split_hash_and_uids_are_stable():
  """Golden values: update them only if changing the splits is intended."""
  problem = tw._problem_from_tree(("*", ("+", 3, 4), 2))
  assert problem.expression == "(3 + 4) * 2"
  assert (problem.uid, tw.is_heldout(problem)) == ("tw2-18dda6af1ea7", False), (
      "tiny-world uids or splits changed; update this golden only if intended")
  heldout = [e for e in (f"{a} + {b}" for a in range(1, 31) for b in range(1, 31))
             if tw.is_heldout(e)]
  assert (len(heldout), heldout[:3]) == (98, ["1 + 6", "2 + 1", "2 + 7"]), (
      "held-out split changed; update this golden only if intended")


def test_canonical_expression_parenthesization():
  assert tw._render(("-", 10, ("-", 5, 2))) == "10 - (5 - 2)"
  assert tw._render(("-", ("-", 10, 5), 2)) == "10 - 5 - 2"
  assert tw._render(("+", 1, ("*", 2, 3))) == "1 + 2 * 3"
  assert tw._render(("*", ("+", 1, 2), 3)) == "(1 + 2) * 3"
  assert tw._render(("*", 2, ("*", 3, 4))) == "2 * (3 * 4)"


def test_questions_are_in_their_language_and_end_without_punctuation(problems):
  langs = collections.Counter(p.lang for p in problems)
  assert min(langs.values()) / len(problems) > 0.4, langs
  for p in problems[:500]:
    assert p.question.endswith(p.expression), p
    assert p.question[-1] not in ".?", p
    words = p.question[:-len(p.expression)]
    assert tw.language_fraction(words, p.lang) == 1.0, p


# ----------------------------------------------------------------------------
# Languages and solutions.


def test_languages_have_disjoint_words():
  assert tw.EN_WORDS and tw.LA_WORDS
  assert not tw.EN_WORDS & tw.LA_WORDS
  assert all(w.islower() and w.isalpha() for w in tw.EN_WORDS | tw.LA_WORDS)
  assert len(tw.EN_WORDS | tw.LA_WORDS) < 100


def test_word_language():
  assert tw.word_language("multiply") == "en"
  assert tw.word_language("The") == "en"
  assert tw.word_language("multiplicamus") == "la"
  for word in ("14", "+", "(", ".", "<think>", "</answer>", "banana", ""):
    assert tw.word_language(word) is None, word


def test_language_fraction():
  assert tw.language_fraction("we add 3 et 4 .", "en") == pytest.approx(2 / 3)
  assert tw.language_fraction("we add 3 et 4 .", "la") == pytest.approx(1 / 3)
  assert tw.language_fraction("3 + 4 = 7 .", "en") == 0.0
  with pytest.raises(ValueError, match="lang"):
    tw.language_fraction("we add", "fr")


def test_solution_text_golden():
  problem = tw._problem_from_tree(("-", ("*", ("+", 3, 4), 2), 5))
  rng = random.Random(0)
  assert tw.solution_text(problem, "en", rng) == (
      "first we add 3 and 4 to get 7 . then we multiply 7 by 2 to get 14 . "
      "finally we subtract 5 from 14 to get 9 . so the answer is 9 .")
  assert tw.solution_text(problem, "la", rng) == (
      "primo addimus 3 et 4 et fit 7 . deinde multiplicamus 7 per 2 et fit 14 . "
      "postremo subtrahimus 5 de 14 et fit 9 . ergo responsum est 9 .")


def test_pure_solutions_are_in_one_language_and_mixed_ones_switch(problems):
  rng = random.Random(0)
  for p in problems[:1000]:
    for lang in tw.LANGS:
      assert tw.language_fraction(tw.solution_text(p, lang, rng), lang) == 1.0
    mixed = tw.solution_text(p, "mixed", rng)
    assert 0.0 < tw.language_fraction(mixed, "en") < 1.0, mixed
    assert re.findall(r"\d+", mixed)[-1] == p.answer
  with pytest.raises(ValueError, match="mode"):
    tw.solution_text(problems[0], "fr", rng)


# ----------------------------------------------------------------------------
# Documents and the corpus.

_PROMPT_PREFIX = R1_ZERO_TEMPLATE.split("{prompt}")[0]
_WELL_FORMED = re.compile(r" <think> [^<>]+ </think> <answer> \d+ </answer>")


def _kind(doc: str) -> str:
  """"plain", "well_formed" or "malformed"."""
  if doc.startswith("Problem: "):
    return "plain"
  assert doc.startswith(_PROMPT_PREFIX), doc
  completion = doc.split(" Assistant:", 1)[1]
  return "well_formed" if _WELL_FORMED.fullmatch(completion) else "malformed"


def _cot(doc: str) -> str:
  """The reasoning of a document (with tags and the problem removed)."""
  text = doc.split("Solution: ", 1)[-1].split(" Assistant:", 1)[-1]
  return re.sub(r"<answer>.*</answer>|</?think>", "", text)


def test_r1_zero_documents():
  problem = tw._problem_from_tree(("+", 3, 4))
  rng = random.Random(0)
  doc = tw.r1_zero_document(problem, "en", rng)
  assert doc == r1_zero_prompt(problem.question) + (
      " <think> we add 3 and 4 to get 7 . so the answer is 7 . </think>"
      " <answer> 7 </answer>")
  assert _kind(doc) == "well_formed"
  for malformation in tw.MALFORMATIONS:
    assert _kind(tw.r1_zero_document(problem, "la", rng, malformation)) == "malformed"
  with pytest.raises(ValueError, match="malformation"):
    tw.r1_zero_completion(problem, "en", rng, "typo")


def test_corpus_is_deterministic(corpus):
  assert corpus == tw.pretraining_corpus(4000, seed=0)
  assert corpus != tw.pretraining_corpus(4000, seed=1)


def test_corpus_uses_only_train_problems(corpus):
  for doc in corpus:
    question = re.search(r"(?:Problem|User): (.*?)(?:\.? Assistant:|\n)", doc).group(1)
    expression = re.search(r"[\d(].*", question).group(0)
    assert not tw.is_heldout(expression), doc


def test_corpus_mixes_document_kinds_in_the_configured_proportions(corpus):
  kinds = collections.Counter(map(_kind, corpus))
  assert abs(kinds["plain"] / len(corpus) - 0.5) < 0.04, kinds
  r1 = kinds["well_formed"] + kinds["malformed"]
  assert abs(kinds["malformed"] / r1 - 0.5) < 0.05, kinds

  other = tw.pretraining_corpus(4000, seed=0, plain_fraction=0.2, malformed_fraction=0.1)
  kinds = collections.Counter(map(_kind, other))
  assert abs(kinds["plain"] / len(other) - 0.2) < 0.03, kinds
  assert abs(kinds["malformed"] / (len(other) - kinds["plain"]) - 0.1) < 0.03, kinds


def test_corpus_mixes_reasoning_languages(corpus):
  modes = collections.Counter()
  for doc in corpus:
    en = tw.language_fraction(_cot(doc), "en")
    modes["en" if en == 1.0 else "la" if en == 0.0 else "mixed"] += 1
  for mode, weight in tw.DEFAULT_MODE_WEIGHTS.items():
    assert abs(modes[mode] / len(corpus) - weight) < 0.04, modes
  only_la = tw.pretraining_corpus(200, seed=0, mode_weights={"la": 1.0})
  assert all(tw.language_fraction(_cot(d), "la") == 1.0 for d in only_la)


def test_corpus_question_language_fraction():
  """That share of documents reasons in the question's language; the others
  pick theirs regardless of the question. 0 is the corpus as before."""
  assert tw.pretraining_corpus(300, seed=0, question_language_fraction=0.0) == \
      tw.pretraining_corpus(300, seed=0)
  problems = tw.generate_problems("train", 4000, 0, tw.LEVELS)
  for f in (0.0, 0.5, 1.0):
    docs = tw.pretraining_corpus(4000, seed=0, question_language_fraction=f)
    same = [tw.language_fraction(_cot(d), p.lang) == 1.0 for d, p in zip(docs, problems)]
    expected = f + (1 - f) * sum(tw.DEFAULT_MODE_WEIGHTS[p.lang] for p in problems) / 4000
    assert abs(sum(same) / 4000 - expected) < 0.03, (f, sum(same) / 4000, expected)
  with pytest.raises(ValueError, match="question_language_fraction"):
    tw.pretraining_corpus(10, seed=0, question_language_fraction=-0.1)


def test_corpus_rejects_bad_mixtures():
  with pytest.raises(ValueError, match="plain_fraction"):
    tw.pretraining_corpus(10, seed=0, plain_fraction=1.5)
  with pytest.raises(ValueError, match="mode_weights"):
    tw.pretraining_corpus(10, seed=0, mode_weights={"fr": 1.0})

"""The tiny world's task: integer arithmetic with step-by-step solutions.

A problem is a left-deep expression over small positive integers with
`+ - *` and parentheses, e.g. "(3 + 4) * 2 - 5". Its level (1..4) is its number of
operations; the worked solution does one operation per sentence, innermost
first and left to right, and every intermediate result is an integer in
[0, MAX_VALUE]. Problems and reasoning come in two surface languages with
disjoint word sets, English (`en`) and a Latin-like `la`, so a pretraining
corpus can code-switch and R1's language-consistency reward has something to
fix. The held-out split is a stable hash of the canonical expression.

  problems = generate_problems("train", 1000, seed=0)
  docs = pretraining_corpus(20_000, seed=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import random
import types
from typing import Mapping, Optional, Sequence, Union

from r1jax.data.templates import r1_zero_prompt

LEVELS = (1, 2, 3, 4)
LANGS = ("en", "la")
MODES = ("en", "la", "mixed")  # reasoning-language modes of a worked solution

MAX_LEAF = 9  # operands are drawn from 1..MAX_LEAF (few facts: a tiny model learns them)
MAX_VALUE = 20  # every intermediate and final result lies in [0, MAX_VALUE]
# One factor of every product is a single digit: a tiny model can learn
# "digit times number", while two-digit by two-digit products are out of reach.
MAX_SMALL_FACTOR = 9
HELDOUT_PER_MILLE = 100  # ~10% of expressions are held out

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_OP_SYMBOLS = tuple(_OPS)
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}

# An expression tree is a leaf int or (op, left, right).
Tree = Union[int, tuple]
Step = tuple[str, int, int, int]  # (op, a, b, result), e.g. ("*", 7, 2, 14)


# ----------------------------------------------------------------------------
# Expression trees.


def _random_shape(num_ops: int, rng: random.Random) -> Tree:
  """A random left-deep tree with `num_ops` operators and leaves set to 0.

  Left-deep: every operation combines the result so far with the next
  operand, e.g. "(3 + 4) * 2 - 5". A worked solution then reads the operands
  in the order they are written, so a tiny model can learn to reason it
  through, while answering without the steps stays hard (the point R1-Zero's
  RL has to discover).
  """
  if num_ops == 0:
    return 0
  return (rng.choice(_OP_SYMBOLS), _random_shape(num_ops - 1, rng), 0)


def _fill_leaves(shape: Tree, rng: random.Random) -> Tree:
  """Replaces every leaf of `shape` with a random operand."""
  if isinstance(shape, int):
    return rng.randint(1, MAX_LEAF)
  op, left, right = shape
  return (op, _fill_leaves(left, rng), _fill_leaves(right, rng))


def _solve(tree: Tree, steps: list) -> Optional[int]:
  """Appends the steps of `tree` in post-order; None if a rule is broken."""
  if isinstance(tree, int):
    return tree
  op, left, right = tree
  a = _solve(left, steps)
  b = None if a is None else _solve(right, steps)
  if b is None:
    return None
  if op == "*" and min(a, b) > MAX_SMALL_FACTOR:
    return None
  result = _OPS[op](a, b)
  if not 0 <= result <= MAX_VALUE:
    return None
  steps.append((op, a, b, result))
  return result


def _render(tree: Tree) -> str:
  """Canonical text with only the parentheses needed to keep the tree."""
  if isinstance(tree, int):
    return str(tree)
  op, left, right = tree
  return f"{_render_child(left, op, False)} {op} {_render_child(right, op, True)}"


def _render_child(child: Tree, parent_op: str, is_right: bool) -> str:
  text = _render(child)
  if isinstance(child, int):
    return text
  # Operators are left-associative: a right child of equal precedence needs
  # parentheses too, or the text would parse (and be solved) differently.
  child_prec, parent_prec = _PRECEDENCE[child[0]], _PRECEDENCE[parent_op]
  if child_prec < parent_prec or (is_right and child_prec == parent_prec):
    return f"({text})"
  return text


# ----------------------------------------------------------------------------
# Problems and splits.

# Problem statements; {e} is the expression. They end without punctuation
# because the R1-Zero template adds a period after the prompt.
_QUESTIONS = {
    "en": ("compute {e}", "evaluate {e}", "calculate {e}",
           "find the value of {e}", "work out {e}"),
    "la": ("computa {e}", "aestima {e}", "calcula {e}",
           "inveni valorem {e}", "expedi {e}"),
}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One tiny-world problem; everything is a function of `expression`."""

  uid: str  # stable id, e.g. "tw3-1f0c9a2b7d4e"
  expression: str  # canonical, e.g. "(3 + 4) * 2 - 5"
  question: str  # statement in `lang`, e.g. "compute (3 + 4) * 2 - 5"
  answer: str  # exact non-negative integer, e.g. "9"
  level: int  # number of operations, 1..4
  lang: str  # language of the question: "en" | "la"
  steps: tuple[Step, ...]  # in solving order


def _digest(expression: str) -> bytes:
  # hashlib, not hash(): splits and phrasing must not change between runs.
  return hashlib.sha256(expression.encode("utf-8")).digest()


def _problem_from_tree(tree: Tree) -> Optional[Problem]:
  """The problem for `tree`, or None if it breaks the value rules."""
  steps = []
  if _solve(tree, steps) is None:
    return None
  expression = _render(tree)
  digest = _digest(expression)
  # Question language and phrasing come from digest bytes the split ignores.
  lang = LANGS[digest[8] % len(LANGS)]
  phrasings = _QUESTIONS[lang]
  question = phrasings[digest[9] % len(phrasings)].format(e=expression)
  return Problem(
      uid=f"tw{len(steps)}-{digest.hex()[:12]}",
      expression=expression,
      question=question,
      answer=str(steps[-1][3]),
      level=len(steps),
      lang=lang,
      steps=tuple(steps),
  )


def _random_problem(level: int, rng: random.Random) -> Problem:
  """A random valid problem with `level` operations."""
  while True:
    # Operands are redrawn for a fixed shape before giving it up, so that
    # operators that constrain operands ('-', '*') are not under-represented.
    shape = _random_shape(level, rng)
    for _ in range(20):
      problem = _problem_from_tree(_fill_leaves(shape, rng))
      if problem is not None:
        return problem


def is_heldout(problem: Union[Problem, str]) -> bool:
  """Whether a problem (or canonical expression) is held out (~10%, by hash)."""
  expression = problem.expression if isinstance(problem, Problem) else problem
  digest = _digest(expression)
  return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def _problems_of_level(split: str, level: int, num: int,
                       rng: random.Random) -> list[Problem]:
  """`num` problems of one level and split, distinct until the space runs dry."""
  want_heldout = split == "heldout"
  seen, out = set(), []
  consecutive_repeats, exhausted = 0, False
  while len(out) < num:
    problem = _random_problem(level, rng)
    if is_heldout(problem) != want_heldout:
      continue
    if problem.expression in seen and not exhausted:
      # Many repeats in a row: the split has (nearly) no unseen problems of
      # this level left, so accept repeats from now on.
      consecutive_repeats += 1
      exhausted = consecutive_repeats >= 200
      continue
    consecutive_repeats = 0
    seen.add(problem.expression)
    out.append(problem)
  return out


def generate_problems(split: str, num: int, seed: int,
                      levels: Sequence[int] = LEVELS) -> list[Problem]:
  """Level-balanced random problems of one split.

  Args:
    split: "train" or "heldout"; only problems with `is_heldout` matching it.
    num: number of problems.
    seed: the output is a deterministic function of (split, num, seed, levels).
    levels: difficulty levels to draw from, in equal shares.

  Returns:
    `num` problems in random order, distinct within the call as long as the
    split has enough problems of each level.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  bad_levels = [lv for lv in levels if lv not in LEVELS]
  if bad_levels or not levels:
    raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
  rng = random.Random(f"tinyworld/{split}/{seed}")
  problems = []
  for i, level in enumerate(levels):
    count = num // len(levels) + (i < num % len(levels))
    problems += _problems_of_level(split, level, count, rng)
  rng.shuffle(problems)
  return problems


# ----------------------------------------------------------------------------
# The two languages.

# Sentence i of n starts with a connective: first, middle ones, last.
_CONNECTIVES = {
    "en": {"first": "first", "middle": ("then", "next"), "last": "finally"},
    "la": {"first": "primo", "middle": ("deinde", "tum"), "last": "postremo"},
}
_STEP_PHRASES = {
    "en": {"+": "we add {a} and {b} to get {r} .",
           "-": "we subtract {b} from {a} to get {r} .",
           "*": "we multiply {a} by {b} to get {r} ."},
    "la": {"+": "addimus {a} et {b} et fit {r} .",
           "-": "subtrahimus {b} de {a} et fit {r} .",
           "*": "multiplicamus {a} per {b} et fit {r} ."},
}
_CONCLUSIONS = {"en": "so the answer is {r} .", "la": "ergo responsum est {r} ."}
# Reflection: what a self-correcting solution says after a wrong step, before
# redoing it (the R1 paper's "wait ... let me re-evaluate"; issue 11).
REFLECTIONS = {"en": "wait , let me check .", "la": "exspecta , recognoscamus ."}


def _words_of(lang: str) -> frozenset:
  """Every word the tiny world writes in `lang`."""
  texts = list(_QUESTIONS[lang]) + list(_STEP_PHRASES[lang].values())
  texts.append(_CONCLUSIONS[lang])
  texts.append(REFLECTIONS[lang])
  connectives = _CONNECTIVES[lang]
  texts += [connectives["first"], connectives["last"], *connectives["middle"]]
  return frozenset(w for t in texts for w in t.split() if w.isalpha())


EN_WORDS = _words_of("en")
LA_WORDS = _words_of("la")
if EN_WORDS & LA_WORDS:  # fail at import: language identification relies on it
  raise AssertionError(f"tiny-world languages share words: {EN_WORDS & LA_WORDS}")
_WORD_LANGUAGE = types.MappingProxyType(
    {**{w: "en" for w in EN_WORDS}, **{w: "la" for w in LA_WORDS}})


def word_language(word: str) -> Optional[str]:
  """"en" or "la" for a tiny-world word (any case, edge punctuation ignored), else None.

  Numbers, symbols, tags and words outside both vocabularies are None.
  """
  return _WORD_LANGUAGE.get(word.strip(".,:;!?()").lower())


def language_fraction(text: str, lang: str) -> float:
  """Fraction of the language-bearing words of `text` that are in `lang`.

  Words are whitespace-separated; text without language words scores 0.0 (no
  evidence of the target language earns no reward).
  """
  if lang not in LANGS:
    raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
  langs = [word_language(w) for w in text.split()]
  langs = [x for x in langs if x is not None]
  return langs.count(lang) / len(langs) if langs else 0.0


# ----------------------------------------------------------------------------
# Worked solutions.


def _sentence_languages(num: int, mode: str, rng: random.Random) -> list[str]:
  """Language of each of `num` sentences; "mixed" switches at least once."""
  if mode in LANGS:
    return [mode] * num
  if mode != "mixed":
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  while True:
    langs = [rng.choice(LANGS) for _ in range(num)]
    if len(set(langs)) > 1:
      return langs


def _step_sentence(step: Step, index: int, num_steps: int, lang: str) -> str:
  """One solving step in `lang`, led by its position's connective."""
  op, a, b, result = step
  sentence = _STEP_PHRASES[lang][op].format(a=a, b=b, r=result)
  connectives = _CONNECTIVES[lang]
  if num_steps == 1:
    return sentence
  if index == 0:
    return f"{connectives['first']} {sentence}"
  if index == num_steps - 1:
    return f"{connectives['last']} {sentence}"
  middle = connectives["middle"]
  return f"{middle[(index - 1) % len(middle)]} {sentence}"


def solution_text(problem: Problem, mode: str, rng: random.Random) -> str:
  """The worked solution: one sentence per step, then the answer sentence.

  Args:
    problem: the problem to solve.
    mode: "en" or "la" for one language, "mixed" to switch language between
      sentences (at least once).
    rng: used only by the "mixed" mode.

  Returns:
    Lower-case, space-separated text, e.g. "first we add 3 and 4 to get 7 .
    finally we multiply 7 by 2 to get 14 . so the answer is 14 ."
  """
  num_steps = len(problem.steps)
  langs = _sentence_languages(num_steps + 1, mode, rng)
  sentences = [_step_sentence(step, i, num_steps, langs[i])
               for i, step in enumerate(problem.steps)]
  sentences.append(_CONCLUSIONS[langs[-1]].format(r=problem.answer))
  return " ".join(sentences)


# ----------------------------------------------------------------------------
# Documents.

# Ways an R1-Zero document breaks the tag format, so that a base model
# prompted with the template follows it only part of the time.
MALFORMATIONS = (
    "no_answer_tags",  # <think> ... </think> and no <answer> block
    "no_close_think",  # <think> ... <answer> N </answer>
    "no_think_tags",  # reasoning without tags, then <answer> N </answer>
    "untagged",  # reasoning only, no tags at all
)
DEFAULT_MODE_WEIGHTS = types.MappingProxyType({"en": 0.4, "la": 0.3, "mixed": 0.3})


def self_correcting_solution(problem: Problem, mode: str, rng: random.Random) -> str:
  """A worked solution that gets one step wrong, reflects, and redoes it right:
  "... we add 3 and 4 to get 8 . wait , let me check . we add 3 and 4 to get 7 . ..."."""
  num_steps = len(problem.steps)
  langs = _sentence_languages(num_steps + 2, mode, rng)
  bad = rng.randrange(num_steps)
  sentences = []
  for i, step in enumerate(problem.steps):
    if i == bad:
      op, a, b, r = step
      wrong = r + rng.choice((-2, -1, 1, 2))
      wrong = wrong if wrong >= 0 else r + 1
      sentences.append(_step_sentence((op, a, b, wrong), i, num_steps, langs[i]))
      sentences.append(REFLECTIONS[langs[-2]])
      sentences.append(_STEP_PHRASES[langs[i]][op].format(a=a, b=b, r=r))
    else:
      sentences.append(_step_sentence(step, i, num_steps, langs[i]))
  sentences.append(_CONCLUSIONS[langs[-1]].format(r=problem.answer))
  return " ".join(sentences)


def drill_document(problems: Sequence[Problem], mode: str, rng: random.Random) -> str:
  """Arithmetic practice: the solving steps of `problems` as bare sentences.

  Like the times tables and worked sums of real pretraining data: dense
  supervision of exactly the facts a worked solution needs, without the
  problem around them, e.g. "we add 3 and 6 to get 9 . we multiply 7 by 2 to
  get 14 ."
  """
  steps = [step for problem in problems for step in problem.steps]
  langs = _sentence_languages(len(steps), mode, rng) if len(steps) > 1 else [
      mode if mode in LANGS else rng.choice(LANGS)]
  return " ".join(_STEP_PHRASES[lang][step[0]].format(a=step[1], b=step[2], r=step[3])
                  for step, lang in zip(steps, langs))


def plain_document(problem: Problem, mode: str, rng: random.Random) -> str:
  """A worked solution as plain text: "Problem: ...\\nSolution: ..."."""
  return f"Problem: {problem.question}\nSolution: {solution_text(problem, mode, rng)}"


def r1_zero_completion(problem: Problem, mode: str, rng: random.Random,
                       malformation: Optional[str] = None) -> str:
  """What follows the R1-Zero prompt; well-formed unless `malformation` is set.

  Well-formed: " <think> {reasoning} </think> <answer> {answer} </answer>".
  "direct" is well-formed but skips the reasoning: the think block holds only
  the answer sentence ("so the answer is N ."), as answer-only solutions do.
  """
  cot, answer = solution_text(problem, mode, rng), problem.answer
  lang = mode if mode in LANGS else rng.choice(LANGS)
  completions = {
      None: f" <think> {cot} </think> <answer> {answer} </answer>",
      "direct": (f" <think> {_CONCLUSIONS[lang].format(r=answer)} </think> "
                 f"<answer> {answer} </answer>"),
      "no_answer_tags": f" <think> {cot} </think>",
      "no_close_think": f" <think> {cot} <answer> {answer} </answer>",
      "no_think_tags": f" {cot} <answer> {answer} </answer>",
      "untagged": f" {cot}",
  }
  if malformation not in completions:
    raise ValueError(f"malformation must be None, 'direct' or one of {MALFORMATIONS}, "
                     f"got {malformation!r}")
  return completions[malformation]


def r1_zero_document(problem: Problem, mode: str, rng: random.Random,
                     malformation: Optional[str] = None) -> str:
  """The R1-Zero prompt for `problem` followed by a completion."""
  return r1_zero_prompt(problem.question) + r1_zero_completion(
      problem, mode, rng, malformation)


def _weighted_choice(weights: Mapping[str, float], rng: random.Random) -> str:
  return rng.choices(list(weights), weights=list(weights.values()))[0]


def pretraining_corpus(
    num_docs: int,
    seed: int,
    *,
    levels: Sequence[int] = LEVELS,
    plain_fraction: float = 0.5,
    malformed_fraction: float = 0.5,
    direct_fraction: float = 0.0,
    drill_fraction: float = 0.0,
    mode_weights: Mapping[str, float] = DEFAULT_MODE_WEIGHTS,
    self_correct_fraction: float = 0.0,
    question_language_fraction: float = 0.0,
) -> list[str]:
  """Pretraining documents built from train-split problems only.

  Args:
    num_docs: number of documents (one problem each, level-balanced).
    seed: the corpus is a deterministic function of all arguments.
    levels: difficulty levels to draw problems from.
    plain_fraction: share of `plain_document`s; the rest are R1-Zero documents.
    malformed_fraction: share of R1-Zero documents that break the tag format
      (one of MALFORMATIONS, uniformly).
    direct_fraction: share of the remaining (well-formed) R1-Zero documents
      that answer without reasoning (`r1_zero_completion(..., "direct")`).
      A base trained on them often skips the reasoning when prompted with the
      template, and is then mostly wrong on multi-step problems: RL has to
      discover that thinking first pays (R1-Zero's growing response length).
    drill_fraction: share of documents that are `drill_document`s of the
      steps of 4 train problems, taken before the other kinds are drawn.
    mode_weights: relative weights of the reasoning-language modes.
    self_correct_fraction: share of plain and well-formed, reasoning R1-Zero
      documents whose solution is `self_correcting_solution` (a wrong step, a
      reflection, the fix): whether RL amplifies reflection becomes a
      measurable question (issue 11). 0 leaves the corpus exactly as before.
    question_language_fraction: share of documents whose reasoning is written
      in the question's language; the others draw their language mode from
      `mode_weights`, independent of the question. A base that has seen some
      answers follow the question's language can learn to (R1's cold start
      and language-consistency reward). At 0 the two are independent and the
      question's language carries no signal about the reasoning's; 0 leaves
      the corpus exactly as before.

  Returns:
    `num_docs` strings, without BOS/EOS.
  """
  for name, value in (("plain_fraction", plain_fraction),
                      ("malformed_fraction", malformed_fraction),
                      ("direct_fraction", direct_fraction),
                      ("drill_fraction", drill_fraction),
                      ("self_correct_fraction", self_correct_fraction),
                      ("question_language_fraction", question_language_fraction)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}")
  if set(mode_weights) - set(MODES) or sum(mode_weights.values()) <= 0:
    raise ValueError(f"mode_weights must weigh modes {MODES}, got {dict(mode_weights)}")
  problems = generate_problems("train", num_docs, seed, levels)
  rng = random.Random(f"tinyworld/corpus/{seed}")
  docs = []
  drill_rng = random.Random(f"tinyworld/drills/{seed}")
  sc_rng = random.Random(f"tinyworld/self_correct/{seed}")  # apart: 0 leaves the rest as it was
  ql_rng = random.Random(f"tinyworld/question_language/{seed}")  # likewise
  for problem in problems:
    mode = _weighted_choice(mode_weights, rng)
    if question_language_fraction and ql_rng.random() < question_language_fraction:
      mode = problem.lang
    if drill_fraction and drill_rng.random() < drill_fraction:
      docs.append(drill_document([problem] + drill_rng.sample(problems, 3), mode, rng))
    elif rng.random() < plain_fraction:
      docs.append(plain_document(problem, mode, rng))
      if self_correct_fraction and sc_rng.random() < self_correct_fraction:
        docs[-1] = (f"Problem: {problem.question}\n"
                    f"Solution: {self_correcting_solution(problem, mode, sc_rng)}")
    else:
      malformed = rng.random() < malformed_fraction
      if malformed:
        kind = rng.choice(MALFORMATIONS)
      else:
        kind = "direct" if direct_fraction and rng.random() < direct_fraction else None
      docs.append(r1_zero_document(problem, mode, rng, kind))
      if kind is None and self_correct_fraction and sc_rng.random() < self_correct_fraction:
        docs[-1] = r1_zero_prompt(problem.question) + (
            f" <think> {self_correcting_solution(problem, mode, sc_rng)} </think> "
            f"<answer> {problem.answer} </answer>")
  return docs

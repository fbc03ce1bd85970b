"""Accuracy reward: extract the final answer, verify it against the gold answer.

Extraction: the last `<answer>…</answer>`, else the last `\\boxed{…}` (nested
braces allowed). Checking, in order:
  1. both sides parse as exact rationals (integers, decimals, fractions,
     `\\frac{a}{b}`, thousands separators, `$`/units stripped): compare exactly;
  2. else math-verify (`parse` + `verify`, the verifier TRL/open-r1 use) for
     LaTeX / symbolic equivalence (`\\sqrt{2}` = `2^{1/2}`);
  3. else string equality after normalisation.
math-verify runs with its SIGALRM timeouts disabled (they only work in a main
thread); callers that may meet adversarial input (`10^{10^{10}}` makes sympy
hang) enforce time limits from outside, see `r1jax.rewards.runner`.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Optional

from math_verify import parse as _mv_parse
from math_verify import verify as _mv_verify

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
# No gold answer is anywhere near this long; sympy parse time grows with length,
# so longer candidate answers are compared as text only.
MAX_SYMBOLIC_CHARS = 1000

# math-verify logs a warning whenever its timeouts are disabled; that is intended here.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _last_boxed(text: str) -> Optional[str]:
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def extract_answer(completion: str) -> Optional[str]:
  """The final answer string of a completion, or None if it gives none."""
  found = _ANSWER_RE.findall(completion)
  if found:
    return found[-1].strip()
  boxed = _last_boxed(completion)
  return boxed.strip() if boxed is not None else None


def normalize(answer: str) -> str:
  """Canonical text form: no spaces, `$`, thousands commas, trailing period."""
  s = answer.strip().rstrip(".").replace("$", "").replace("\\!", "")
  s = re.sub(r"\\(left|right|,|;|:)", "", s)
  s = _FRAC_RE.sub(r"(\1)/(\2)", s)
  s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
  return re.sub(r"\s+", "", s)


def parse_number(answer: str) -> Optional[Fraction]:
  """Exact rational value of a numeric answer, or None."""
  s = normalize(answer)
  s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
  s = re.sub(r"[a-zA-Z%]+$", "", s)  # trailing units
  try:
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def _math_verify_equal(answer: str, gold: str) -> Optional[bool]:
  """math-verify's verdict, or None when it cannot parse one of the sides."""
  def mv_parse(s):
    return _mv_parse(f"${s.strip().strip('$')}$", parsing_timeout=None)
  g, a = mv_parse(gold), mv_parse(answer)
  if not g or not a:
    return None
  return bool(_mv_verify(g, a, timeout_seconds=None))


def is_equivalent(answer: str, gold: str) -> bool:
  """Exact rational equality when both are numbers, else math-verify, else normalised text."""
  a, g = parse_number(answer), parse_number(gold)
  if a is not None and g is not None:
    return a == g
  if not answer.strip():
    return False
  if len(answer) <= MAX_SYMBOLIC_CHARS:
    verdict = _math_verify_equal(answer, gold)
    if verdict:
      return True
  return normalize(answer) == normalize(gold)


def accuracy_reward(completion: str, gold: str) -> float:
  """1.0 if the completion's extracted answer equals the gold answer, else 0.0."""
  answer = extract_answer(completion)
  return float(answer is not None and is_equivalent(answer, gold))


def accuracy_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """`accuracy_reward` in the `(prompt, completion, reference)` reward signature."""
  del prompt
  return accuracy_reward(completion, reference)

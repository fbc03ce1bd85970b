"""Answer extraction and exact checking against a gold answer.

Extraction: the last `<answer>…</answer>`, else the last `\\boxed{…}`.
Checking: both sides parsed as exact rationals (integers, decimals, fractions,
`\\frac{a}{b}`, thousands separators, `$`/units stripped); string equality
after normalisation otherwise.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


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


def is_equivalent(answer: str, gold: str) -> bool:
  """Exact equality as numbers when both parse, else as normalised text."""
  a, g = parse_number(answer), parse_number(gold)
  if a is not None and g is not None:
    return a == g
  return normalize(answer) == normalize(gold)


def accuracy_reward(completion: str, gold: str) -> float:
  """1.0 if the completion's extracted answer equals the gold answer, else 0.0."""
  answer = extract_answer(completion)
  return float(answer is not None and is_equivalent(answer, gold))

"""Task files in JSON Lines: one problem per line, read with errors that name
the file, the line and the field at fault.

  problems, counts = load_problems("../shared/data/gsm8k/test.jsonl")

A line is a JSON object with a question (`question`, `problem` or `prompt`)
and either a gold answer (`answer`) or code tests (`tests`, see
r1jax.rewards.code.parse_tests), and optionally a difficulty `level` (or
`difficulty`: an integer >= 1, or MATH's "Level 3"; for curricula,
r1jax.data.curriculum). A gold answer is normalised to what the
accuracy reward compares with: the text after `#### ` (GSM8K solutions), the
last `\\boxed{}` of a solution, or a number (27.0 -> "27"); an answer that
neither parses as a number nor as LaTeX math is *unverifiable*: the problem is
skipped and counted (never rewarded 1.0 by a lenient string match).

`on_error="raise"` stops at the first malformed line (a `JsonlError` naming
file:line and field); `"skip"` drops it, counts it and logs the first few.
Bad gold answers are always skipped and counted (the file is fine, the
problem is not trainable). `counts` is a `collections.Counter`: `lines`,
`blank`, `kept`, `malformed`, `bad_gold`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import re
from fractions import Fraction
from typing import Optional, Sequence

from r1jax.errors import UserError

QUESTION_FIELDS = ("question", "problem", "prompt")
LEVEL_FIELDS = ("level", "difficulty")
ON_ERROR = ("raise", "skip")
_LOGGED_SKIPS = 5  # malformed lines logged one by one; the rest only counted
# math-verify reads any word as a product of symbols ("None" -> E*n*n*o), so
# plain words (three letters or more, not a LaTeX command) and placeholders
# mark a gold answer as unverifiable.
_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_PLACEHOLDERS = {"n/a", "na", "none", "null", "nan", "unknown", "tbd", "?", "-"}


class JsonlError(UserError, ValueError):
  """A malformed line of a task file; the message starts with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class TaskProblem:
  """One problem of a task file (fields used by the trainers: `question`, `answer`)."""

  uid: str  # the row's `id` if it has one, else "<file name>:<line>"
  question: str
  answer: str  # normalised gold answer, or the code tests as JSON
  source: str  # "<path>:<line>"
  kind: str  # "math" | "code"
  level: int = 0  # difficulty from the row's `level` / `difficulty` (>= 1); 0: none given


def gold_answer(value, *, where: str = "answer") -> str:
  """The verifiable final answer in `value`; ValueError when there is none."""
  from r1jax.rewards import accuracy  # deferred: math-verify import is slow
  if isinstance(value, bool) or value is None:
    raise ValueError(f"field {where!r} is {json.dumps(value)}, not an answer")
  if isinstance(value, (int, float)):
    if not math.isfinite(value):
      raise ValueError(f"field {where!r} is {value}, not a finite number")
    f = Fraction(value).limit_denominator(10**9) if isinstance(value, float) else Fraction(value)
    return str(f.numerator) if f.denominator == 1 else str(value)
  if not isinstance(value, str):
    raise ValueError(f"field {where!r} must be a string or a number, got {type(value).__name__}")
  text = value
  if "####" in text:  # GSM8K: worked solution, then "#### 18"
    text = text.rsplit("####", 1)[1]
  elif accuracy.extract_answer(text) is not None:  # a solution with \boxed{} / <answer>
    text = accuracy.extract_answer(text)
  text = text.strip()
  if not text:
    raise ValueError(f"field {where!r} has an empty final answer")
  if accuracy.parse_number(text) is not None:
    return text
  if (text.lower() not in _PLACEHOLDERS and not _WORD_RE.search(text)
      and len(text) <= accuracy.MAX_SYMBOLIC_CHARS
      and len(accuracy._mv_parse(f"${text.strip('$')}$", parsing_timeout=None)) >= 2):  # pylint: disable=protected-access
    return text  # math-verify gives [expression, text]; [text] alone means it failed
  raise ValueError(f"field {where!r}: final answer {text[:80]!r} is neither a number nor "
                   "parseable math")


def _level(row: dict, where: str) -> int:
  """The row's difficulty level (>= 1), 0 if it has none; JsonlError naming the field."""
  field = next((f for f in LEVEL_FIELDS if f in row), None)
  if field is None:
    return 0
  value = row[field]
  if isinstance(value, str):  # MATH writes "Level 3"
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", value, re.IGNORECASE)
    value = int(m.group(1)) if m else value
  elif isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise JsonlError(f"{where}: field {field!r} must be an integer level >= 1, got "
                     f"{json.dumps(row[field])}")
  return value


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise JsonlError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                     f"{e.start + 1})") from None


def parse_line(raw: bytes, where: str, *, question_fields: Sequence[str] = QUESTION_FIELDS,
               answer_field: str = "answer", tests_field: str = "tests") -> dict:
  """A line's JSON object with a string question; JsonlError naming `where` and the field."""
  text = _decode(raw, where)
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise JsonlError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, dict):
    raise JsonlError(f"{where}: expected a JSON object, got {type(row).__name__}")
  qf = next((f for f in question_fields if f in row), None)
  if qf is None:
    raise JsonlError(f"{where}: field {question_fields[0]!r} missing (looked for "
                     f"{', '.join(question_fields)}; the line has {', '.join(sorted(row)) or 'no fields'})")
  if not isinstance(row[qf], str) or not row[qf].strip():
    raise JsonlError(f"{where}: field {qf!r} must be a non-empty string")
  if answer_field not in row and tests_field not in row:
    raise JsonlError(f"{where}: field {answer_field!r} missing (or {tests_field!r} for code)")
  return dict(row, _question_field=qf, _level=_level(row, where))


def load_problems(path: str, *, on_error: str = "raise", limit: Optional[int] = None,
                  question_fields: Sequence[str] = QUESTION_FIELDS, answer_field: str = "answer",
                  tests_field: str = "tests") -> tuple[list[TaskProblem], collections.Counter]:
  """Problems of a jsonl task file and the counts of what was kept and skipped.

  Args:
    path: the .jsonl file (UTF-8; one JSON object per line; blank lines ignored).
    on_error: "raise" (JsonlError on the first malformed line) or "skip" (count it).
    limit: stop after this many kept problems.
    question_fields: the first of these present is the question.
    answer_field: the gold answer (math).
    tests_field: code tests (JSON object or its text), used when there is no answer.
  """
  from r1jax.rewards import code  # deferred: pulls in the sandbox
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  counts = collections.Counter(lines=0, blank=0, kept=0, malformed=0, bad_gold=0)
  problems = []
  try:
    f = open(path, "rb")
  except OSError as e:
    raise JsonlError(f"{path}: cannot read task file ({e.strerror})") from None
  with f:
    for lineno, raw in enumerate(f, start=1):
      counts["lines"] += 1
      where = f"{path}:{lineno}"
      if not raw.strip():
        counts["blank"] += 1
        continue
      try:
        row = parse_line(raw, where, question_fields=question_fields, answer_field=answer_field,
                         tests_field=tests_field)
      except JsonlError as e:
        if on_error == "raise":
          raise
        counts["malformed"] += 1
        if counts["malformed"] <= _LOGGED_SKIPS:
          logging.warning("skipping malformed line: %s", e)
        continue
      try:
        if answer_field in row:
          kind, answer = "math", gold_answer(row[answer_field], where=answer_field)
        else:
          tests = row[tests_field]
          code.parse_tests(tests)  # validates; raises ValueError naming the field
          kind, answer = "code", tests if isinstance(tests, str) else json.dumps(tests)
      except ValueError as e:
        counts["bad_gold"] += 1
        if counts["bad_gold"] <= _LOGGED_SKIPS:
          logging.warning("skipping problem with an unverifiable gold answer: %s: %s", where, e)
        continue
      uid = str(row["id"]) if "id" in row else f"{path.rsplit('/', 1)[-1]}:{lineno}"
      problems.append(TaskProblem(uid, row[row["_question_field"]].strip(), answer, where, kind,
                                  row["_level"]))
      counts["kept"] += 1
      if limit is not None and counts["kept"] >= limit:
        break
  if counts["malformed"] or counts["bad_gold"]:
    logging.warning("%s: kept %d problems, skipped %d malformed lines and %d unverifiable "
                    "gold answers", path, counts["kept"], counts["malformed"], counts["bad_gold"])
  return problems, counts


OVERLONG = ("truncate_left", "skip")


def fit_prompt(ids: Sequence[int], max_tokens: int, policy: str) -> Optional[list[int]]:
  """`ids` if they fit in `max_tokens`, else the last `max_tokens` (truncate_left) or None (skip)."""
  if policy not in OVERLONG:
    raise ValueError(f"overlong prompt policy must be one of {OVERLONG}, got {policy!r}")
  if max_tokens < 1:
    raise ValueError(f"max prompt tokens must be >= 1, got {max_tokens}")
  if len(ids) <= max_tokens:
    return list(ids)
  return list(ids[len(ids) - max_tokens:]) if policy == "truncate_left" else None


def fit_prompts(prompts: Sequence[Sequence[int]], max_tokens: int, policy: str,
                counts: Optional[collections.Counter] = None) -> list[Optional[list[int]]]:
  """`fit_prompt` over a batch; counts `prompts_truncated` / `prompts_skipped` in `counts`."""
  out = [fit_prompt(p, max_tokens, policy) for p in prompts]
  if counts is not None:
    over = sum(len(p) > max_tokens for p in prompts)
    counts["prompts_truncated" if policy == "truncate_left" else "prompts_skipped"] += over
  return out


def read_string_rows(path: str, fields: Sequence[str]) -> list[dict]:
  """JSON-object rows of a jsonl file whose `fields` are strings (blank lines skipped);
  JsonlError naming file:line and the field on anything else."""
  rows = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(_decode(raw, where))
      except json.JSONDecodeError as e:
        raise JsonlError(f"{where}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise JsonlError(f"{where}: expected a JSON object")
      for field in fields:
        if not isinstance(row.get(field), str):
          raise JsonlError(f"{where}: field {field!r} missing or not a string")
      rows.append(row)
  return rows

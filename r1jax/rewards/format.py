"""Format rewards: the strict R1-Zero rule and open-r1's partial-credit tag count."""

from __future__ import annotations

import re

_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
# R1's readable format: the reasoning, a summary for the reader, then the answer.
_SUMMARY_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>([^<]*)<answer>(.*?)</answer>\s*$",
                                re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str, *, summary: bool = False) -> float:
  """1.0 if the completion is exactly one think block then one answer block; with
  `summary`, non-empty text (the summary) must stand between the two."""
  if any(completion.count(t) != 1 for t in _TAGS):
    return 0.0
  if summary:
    m = _SUMMARY_FORMAT_RE.match(completion)
    return float(m is not None and bool(m.group(2).strip()))
  return float(_FORMAT_RE.match(completion) is not None)


def tag_count_reward(completion: str) -> float:
  """0.25 per tag that appears exactly once (repeating a tag earns nothing for it)."""
  return 0.25 * sum(completion.count(t) == 1 for t in _TAGS)


def format_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """`format_reward` in the `(prompt, completion, reference)` reward signature."""
  del prompt, reference
  return format_reward(completion)


def summary_format_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """R1's readable format (think, summary, answer) in the reward signature."""
  del prompt, reference
  return format_reward(completion, summary=True)


def tag_count_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """`tag_count_reward` in the `(prompt, completion, reference)` reward signature."""
  del prompt, reference
  return tag_count_reward(completion)

"""R1-Zero format rule: `<think>…</think>` then `<answer>…</answer>`, nothing after."""

from __future__ import annotations

import re

_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str) -> float:
  """1.0 if the completion is exactly one think block then one answer block."""
  if any(completion.count(t) != 1 for t in _TAGS):
    return 0.0
  return float(_FORMAT_RE.match(completion) is not None)

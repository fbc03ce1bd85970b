"""pass@k and cons@k from per-sample answers (as the R1 paper reports them)."""

from __future__ import annotations

import collections
from math import comb
from typing import Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - comb(n - c, k) / comb(n, k)


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
  """Most common non-None answer; ties go to the one seen first."""
  counts = collections.Counter(a for a in answers if a is not None)
  if not counts:
    return None
  best = max(counts.values())
  return next(a for a in answers if a is not None and counts[a] == best)

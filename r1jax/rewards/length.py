"""DAPO soft over-long punishment (arXiv 2503.14476, eq. 13)."""

from __future__ import annotations


def overlong_penalty(completion_length: int, *, max_length: int, cache_length: int) -> float:
  """0 up to `max_length - cache_length` tokens, then a linear ramp to -1 at `max_length`, -1 beyond.

  Args:
    completion_length: completion length in tokens.
    max_length: L_max, the generation budget in tokens.
    cache_length: L_cache, the width of the soft-penalty band in tokens.

  Returns:
    The penalty in [-1, 0], added to the other rewards.
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length=} {max_length=}")
  expected = max_length - cache_length
  if completion_length <= expected:
    return 0.0
  if completion_length <= max_length:
    return (expected - completion_length) / cache_length
  return -1.0

"""Which problems a GRPO step trains on: prompt curricula and DAPO dynamic sampling.

Modes (`grpo.curriculum.mode`):
- `uniform`: every step draws from all `grpo.levels`; round 0 is exactly what
  the trainer drew before curricula existed (old runs do not change).
- `fixed`: stage i's levels (`stage_levels[i]`) from GRPO step
  `stage_steps[i - 1]` on; the stage is a pure function of the step.
- `adaptive`: start at the lowest level and add the next one when the step's
  accuracy on the hardest allowed level reaches `threshold` (after at least
  `min_steps_per_level` steps there).

Dynamic sampling (DAPO, Yu et al. 2025): a group whose G completions are all
right or all wrong has zero advantage and no gradient. The trainer drops such
groups (`informative_groups`) and draws more prompts (`draw(step, round)`,
rounds 1, 2, ... up to `max_rounds` draws) to fill the batch.

Draws are deterministic: the tiny world's problems are generated from a seed
of (seed, step, round); a task file is read in grain-shuffled epoch order
(`datasets.StepBatches`) from cursors that are part of `state_dict()`, so a
resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import bisect
import logging
from typing import Sequence

import ml_collections
import numpy as np

from r1jax.data import datasets, tinyworld
from r1jax.errors import ConfigError

MODES = ("uniform", "fixed", "adaptive")


def default_config() -> ml_collections.ConfigDict:
  """The `grpo.curriculum` section."""
  cc = ml_collections.ConfigDict()
  cc.mode = "uniform"  # "uniform" | "fixed" | "adaptive"
  cc.stage_levels = ()  # fixed: levels of each stage, e.g. ((1,), (1, 2), (1, 2, 3))
  cc.stage_steps = ()  # fixed: GRPO step at which each next stage starts, e.g. (10, 20)
  cc.threshold = 0.6  # adaptive: accuracy on the hardest level (0, 1] that adds the next
  cc.min_steps_per_level = 2  # adaptive: GRPO steps at a level before the next is added
  cc.dynamic_sampling = False  # DAPO: drop all-right / all-wrong groups, draw more prompts
  cc.max_rounds = 3  # dynamic sampling: at most this many draws of prompts_per_step per step
  return cc


def validate(cc: ml_collections.ConfigDict, levels: Sequence[int]) -> None:
  """Raises ConfigError naming the first bad `grpo.curriculum` field."""
  if cc.mode not in MODES:
    raise ConfigError(f"grpo.curriculum.mode must be one of {MODES}, got {cc.mode!r}")
  if cc.mode == "fixed":
    stages, starts = list(cc.stage_levels), list(cc.stage_steps)
    if not stages:
      raise ConfigError("grpo.curriculum.stage_levels is empty (mode 'fixed' needs stages)")
    for i, stage in enumerate(stages):
      if not stage or not set(stage) <= set(levels):
        raise ConfigError(f"grpo.curriculum.stage_levels[{i}]={tuple(stage)} must be a non-empty "
                          f"subset of grpo.levels={tuple(levels)}")
    if len(starts) != len(stages) - 1:
      raise ConfigError(f"grpo.curriculum.stage_steps has {len(starts)} entries; "
                        f"{len(stages)} stages need {len(stages) - 1}")
    if any(s <= 0 for s in starts) or any(a >= b for a, b in zip(starts, starts[1:])):
      raise ConfigError(f"grpo.curriculum.stage_steps={tuple(starts)} must be positive and "
                        "strictly increasing")
  if not 0 < cc.threshold <= 1:
    raise ConfigError(f"grpo.curriculum.threshold must be in (0, 1], got {cc.threshold}")
  if cc.min_steps_per_level < 1:
    raise ConfigError(f"grpo.curriculum.min_steps_per_level must be >= 1, got "
                      f"{cc.min_steps_per_level}")
  if cc.max_rounds < 1:
    raise ConfigError(f"grpo.curriculum.max_rounds must be >= 1, got {cc.max_rounds}")


def informative_groups(correct_BG: np.ndarray) -> tuple[np.ndarray, int, int]:
  """(mask_B of groups whose scores differ, number all right, number all wrong)."""
  c_BG = np.asarray(correct_BG, np.float32)
  mask_B = c_BG.min(axis=1) != c_BG.max(axis=1)  # equal scores: zero advantage
  return mask_B, int((c_BG >= 1).all(axis=1).sum()), int((c_BG <= 0).all(axis=1).sum())


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Curriculum:
  """Draws each step's problems; its state (level, cursors) goes in the checkpoint.

  Args:
    cc: the `grpo.curriculum` config (`default_config()`).
    levels: `grpo.levels`, the levels a curriculum climbs (tiny world: 1..4).
    prompts_per_step: B, a round's default number of problems.
    seed: the run's seed.
    task: a task file's (problem, prompt ids) pairs; None for the tiny world.
  """

  def __init__(self, cc: ml_collections.ConfigDict, *, levels: Sequence[int],
               prompts_per_step: int, seed: int, task: list | None = None):
    validate(cc, levels)
    self.cc, self.levels, self.seed, self.task = cc, tuple(levels), seed, task
    self.prompts_per_step = prompts_per_step
    self._k = 0  # adaptive: sorted(levels)[:k + 1] are allowed
    self._top = max(self.levels_at(0))  # hardest level of the last observed step
    self._steps_at_level = 0  # consecutive observed steps with that hardest level
    self._accuracy = None  # last observed step's accuracy on its hardest level
    self._extra = 0  # problems drawn in rounds > 0 (shifts a uniform task's order)
    self._next = 0  # uniform task: where the step's next round starts
    self._cursors = {}  # non-uniform task: level -> problems drawn from its stream
    if task is not None:
      self._all = datasets.StepBatches(task, 1, seed)  # the trainer's order, one item a step
      if cc.mode != "uniform":
        by_level = {lv: [x for x in task if x[0].level == lv] for lv in self.levels}
        if not any(x[0].level for x in task):
          raise ConfigError(f"grpo.curriculum.mode={cc.mode!r} needs problem levels; the task "
                            "has none (give rows a 'level' or 'difficulty' field)")
        if missing := [lv for lv, xs in by_level.items() if not xs]:
          raise ConfigError(f"grpo.levels={self.levels}: the task has no problems of level(s) "
                            f"{missing}")
        if unused := sum(x[0].level not in self.levels for x in task):
          logging.warning("curriculum: %d of %d task problems have a level outside grpo.levels=%s "
                          "and are never drawn", unused, len(task), self.levels)
        self._streams = {lv: datasets.StepBatches(xs, 1, _seed(seed, lv, 11))
                         for lv, xs in by_level.items()}
        self._cursors = {lv: 0 for lv in self.levels}

  def levels_at(self, step: int) -> tuple[int, ...]:
    """The levels that step `step` draws from."""
    if self.cc.mode == "fixed":
      return tuple(self.cc.stage_levels[bisect.bisect_right(list(self.cc.stage_steps), step)])
    if self.cc.mode == "adaptive":
      return tuple(sorted(self.levels)[:self._k + 1])
    return self.levels

  # pylint: disable-next=redefined-builtin
  def draw(self, step: int, round: int = 0, n: int | None = None) -> list:
    """`n` problems (tiny world) or (problem, prompt ids) pairs (task) for a round of a step.

    Rounds of a step are drawn in order 0, 1, ...; a task's later rounds
    continue its order where the previous round stopped.
    """
    n = self.prompts_per_step if n is None else n
    if round > 0:
      self._extra += n
    levels = self.levels_at(step)
    if self.task is None:
      if round == 0 and sorted(levels) == sorted(self.levels):
        return tinyworld.generate_problems("train", n, self.seed * 1_000_003 + step, self.levels)
      # Negative: never one of round 0's seeds (seed * 1_000_003 + step >= 0).
      return tinyworld.generate_problems("train", n, -1 - _seed(self.seed, step, round, 7), levels)
    if self.cc.mode == "uniform":
      start = self._next if round > 0 else step * self.prompts_per_step + self._extra
      self._next = start + n
      return [self.task[self._all.indices(i)[0]] for i in range(start, start + n)]
    drawn = []
    for i, lv in enumerate(sorted(levels)):  # equal shares, the remainder to the lowest levels
      count, stream = n // len(levels) + (i < n % len(levels)), self._streams[lv]
      at = self._cursors[lv]
      drawn += [stream.items[stream.indices(j)[0]] for j in range(at, at + count)]
      self._cursors[lv] = at + count
    order = np.random.default_rng([self.seed, step, round, 13]).permutation(len(drawn))
    return [drawn[j] for j in order]  # mixed, so contiguous mini-batches mix levels

  def observe(self, step: int, levels: Sequence[int], correct: np.ndarray) -> None:
    """Records a step's outcome; adaptive mode adds the next level here.

    Args:
      step: the GRPO step.
      levels: the level of each group sampled (all rounds, before dynamic
        sampling drops any: all-right groups are the evidence of mastery).
      correct: correct_BG, 0/1 accuracy of each completion, [groups, G].
    """
    levels_B, correct_BG = np.asarray(levels), np.asarray(correct, np.float32)
    if correct_BG.ndim != 2 or correct_BG.shape[0] != len(levels_B):
      raise ValueError(f"correct must be [groups, G] with {len(levels_B)} groups, got "
                       f"{correct_BG.shape}")
    top = max(self.levels_at(step))
    if top != self._top:
      self._top, self._steps_at_level = top, 0
    self._steps_at_level += 1
    on_top_B = levels_B == top
    self._accuracy = float(correct_BG[on_top_B].mean()) if on_top_B.any() else None
    if (self.cc.mode == "adaptive" and self._k + 1 < len(self.levels)
        and self._steps_at_level >= self.cc.min_steps_per_level
        and self._accuracy is not None and self._accuracy >= self.cc.threshold):
      self._k += 1

  def state_dict(self) -> dict:
    """JSON-able state (for the checkpoint's metadata)."""
    return dict(mode=self.cc.mode, k=self._k, top=self._top, steps_at_level=self._steps_at_level,
                accuracy=self._accuracy, extra=self._extra,
                cursors={str(lv): c for lv, c in self._cursors.items()})

  def load_state_dict(self, d: dict) -> None:
    """Restores `state_dict()` (after a JSON round trip)."""
    if d["mode"] != self.cc.mode:
      raise ConfigError(f"grpo.curriculum.mode={self.cc.mode!r}, but the checkpoint's "
                        f"curriculum ran in mode {d['mode']!r}")
    self._k, self._top, self._steps_at_level = int(d["k"]), int(d["top"]), int(d["steps_at_level"])
    self._accuracy, self._extra = d["accuracy"], int(d["extra"])
    self._cursors.update({int(lv): int(c) for lv, c in d["cursors"].items()})

  def metrics(self) -> dict[str, float]:
    """Scalars to log after `observe`."""
    out = {"curriculum/max_level": float(self._top),
           "curriculum/steps_at_level": float(self._steps_at_level),
           "curriculum/extra_prompts": float(self._extra)}
    if self._accuracy is not None:
      out["curriculum/top_level_accuracy"] = self._accuracy
    return out

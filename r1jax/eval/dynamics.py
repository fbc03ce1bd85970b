"""Self-evolution metrics of RL (the R1 paper's training-dynamics findings):
completion length overall and per difficulty level, the rate of reflection
markers, how often a reflection changes the answer, accuracy per level.

`step_dynamics(completions, lengths, levels, correct)` returns flat scalars
for metrics.jsonl / TensorBoard.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import numpy as np

# Phrases that mark a reflection, per language (matched as whole words, any
# case). The tiny world's reflection sentences (tinyworld.REFLECTIONS) hit them.
DEFAULT_MARKERS: Mapping[str, tuple[str, ...]] = {
    "en": ("wait", "let me check", "re-evaluate", "reevaluate", "aha", "let me recheck"),
    "la": ("exspecta", "recognoscamus"),
}
_INT_RE = re.compile(r"(?<![\w.])-?\d+(?![\w])")


def _marker_regex(markers: Sequence[str]) -> re.Pattern:
  alternatives = sorted({re.escape(m.lower()) for m in markers}, key=len, reverse=True)
  return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def all_markers(markers: Optional[Mapping[str, Sequence[str]]] = None) -> tuple[str, ...]:
  markers = DEFAULT_MARKERS if markers is None else markers
  return tuple(m for ms in markers.values() for m in ms)


def reflections(text: str, markers: Sequence[str] = all_markers()) -> list[tuple[int, int]]:
  """(start, end) of every reflection in `text`; overlapping phrases of one
  reflection ("wait , let me check") count once: markers closer than one
  sentence apart merge."""
  spans = [m.span() for m in _marker_regex(markers).finditer(text)]
  merged: list[tuple[int, int]] = []
  for s, e in spans:
    if merged and " . " not in f" {text[merged[-1][1]:s]} ":
      merged[-1] = (merged[-1][0], e)
    else:
      merged.append((s, e))
  return merged


def reflection_changes(text: str, markers: Sequence[str] = all_markers()) -> list[bool]:
  """For each reflection: does the number it revisits change? The last integer
  before the marker is compared with the last integer of the first sentence
  after the marker's own sentence ("... to get 8 . wait , let me check . we
  add 3 and 4 to get 7 ." -> True)."""
  out = []
  for start, end in reflections(text, markers):
    before = _INT_RE.findall(text[:start])
    rest = text[end:]
    cut = rest.find(" .")
    rest = rest[cut + 2:] if cut >= 0 else ""  # skip the rest of the marker's sentence
    nxt = rest.split(" .")[0] if rest.strip() else ""
    after = _INT_RE.findall(nxt)
    out.append(bool(before and after and before[-1] != after[-1]))
  return out


def length_stats(lengths: Sequence[float], prefix: str = "completions/length") -> dict:
  x = np.asarray(lengths, np.float64)
  if x.size == 0:
    return {}
  return {f"{prefix}/mean": float(x.mean()), f"{prefix}/p50": float(np.percentile(x, 50)),
          f"{prefix}/p90": float(np.percentile(x, 90))}


def step_dynamics(completions: Sequence[str], lengths: Sequence[float],
                  levels: Optional[Sequence[int]] = None,
                  correct: Optional[Sequence[float]] = None,
                  markers: Optional[Mapping[str, Sequence[str]]] = None) -> dict[str, float]:
  """Flat metrics for one RL step's completions.

  Args:
    completions: the decoded completions.
    lengths: their lengths in tokens.
    levels: difficulty level of each completion's problem (per-level metrics).
    correct: accuracy reward of each completion (accuracy per level).
    markers: reflection phrases per language (default DEFAULT_MARKERS).
  Returns:
    completions/length/{mean,p50,p90} overall and per level (`.../level_L/...`),
    reflection/rate (share of completions with a reflection),
    reflection/per_completion, reflection/changed_answer_rate (share of
    reflections followed by a different number), accuracy/level_L.
  """
  ms = all_markers(markers)
  out = length_stats(lengths)
  refl = [reflections(c, ms) for c in completions]
  changes = [x for c in completions for x in reflection_changes(c, ms)]
  out["reflection/rate"] = float(np.mean([bool(r) for r in refl])) if refl else 0.0
  out["reflection/per_completion"] = float(np.mean([len(r) for r in refl])) if refl else 0.0
  out["reflection/changed_answer_rate"] = float(np.mean(changes)) if changes else 0.0
  if levels is not None:
    lv = np.asarray(levels)
    for level in sorted(set(lv.tolist())):
      sel = lv == level
      out.update(length_stats(np.asarray(lengths)[sel], f"completions/length/level_{level}"))
      out[f"reflection/rate/level_{level}"] = float(np.mean([bool(r) for r, s in zip(refl, sel) if s]))
      if correct is not None:
        out[f"accuracy/level_{level}"] = float(np.asarray(correct, np.float64)[sel].mean())
  return out


"""What a user sees while a job runs: JSONL + TensorBoard metrics and PNG curves.

Only process 0 writes, so multi-host runs log once.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping

import jax


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines to WORKDIR/metrics.jsonl and the
  same scalars to TensorBoard under WORKDIR/tensorboard.

  `resume_step`: the step a run resumes from. Rows a killed run wrote after
  its last checkpoint are dropped (the resumed run writes them again, so the
  file ends up as an uninterrupted run's), and TensorBoard is told to purge
  its events past that step.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      if resume_step is not None:
        truncate_jsonl(self.path, resume_step)
      from tensorboardX import SummaryWriter  # deferred: heavy import
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self.enabled:
      return
    clean = {k: _to_float(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      if v is not None and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _to_float(v):
  v = float(v)
  return v if math.isfinite(v) else None  # JSON has no NaN; null marks it


def truncate_jsonl(path: str, last_step: int) -> int:
  """Drops the rows of `path` with `step > last_step`, and a torn last line
  (a write cut by a kill); rewrites atomically. Returns the rows dropped."""
  if not os.path.exists(path):
    return 0
  keep, dropped = [], 0
  with open(path, "rb") as f:
    for line in f:
      try:
        row = json.loads(line)
        ok = line.endswith(b"\n") and int(row["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        keep.append(line)
      else:
        dropped += bool(line.strip())
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.writelines(keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def read_metrics(path: str) -> list[dict]:
  """The JSONL rows; after a resume the last row written for a step wins."""
  by_step: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def plot_curves(metrics_path: str, keys: Iterable[str], out_png: str, title: str = ""):
  """One panel per key against step (raw and a moving average)."""
  # A bare Figure renders with Agg without switching pyplot's global backend
  # (matplotlib.use("Agg") turned inline plots off in a notebook that trains).
  from matplotlib.figure import Figure
  import numpy as np

  rows = read_metrics(metrics_path)
  keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
  if not keys:
    return None
  fig = Figure(figsize=(4.5 * len(keys), 3.4))
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    steps, vals = np.array(pts).T
    ax.plot(steps, vals, alpha=0.35, lw=1)
    w = max(1, len(vals) // 20)
    if w > 1:
      ax.plot(steps[w - 1:], np.convolve(vals, np.ones(w) / w, "valid"), lw=2)
    ax.set_xlabel("step")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  return out_png

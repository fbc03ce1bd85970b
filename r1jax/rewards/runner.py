"""Weighted rule rewards scored in worker processes with a per-item time limit.

A reward is a picklable top-level function (or `functools.partial` of one)
`(prompt, completion, reference) -> float`. Verifiers can hang (sympy on
`10^{10^{10}}`) or crash; either scores 0 and is counted, and a hung worker is
killed: at most `workers` items are in flight, so each item's clock starts when
it is handed to an idle worker, and on a timeout the whole pool is killed and
rebuilt (the other in-flight items are resubmitted).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import math
import multiprocessing
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[[str, str, str], float]

# Seconds a fresh worker may take to start and import the reward modules.
_STARTUP_TIMEOUT_S = 120.0


def _fn_module(fn) -> str:
  return getattr(getattr(fn, "func", fn), "__module__")


def _import_modules(names: Sequence[str]) -> None:
  for name in names:
    importlib.import_module(name)


def _warmup() -> int:
  time.sleep(0.05)  # long enough that an idle sibling worker takes the next warm-up
  return os.getpid()


def _call(fn: RewardFn, prompt: str, completion: str, reference: str) -> tuple[bool, float | str]:
  """Runs one reward; (True, value) or (False, error text). Never raises."""
  try:
    value = float(fn(prompt, completion, reference))
    if not math.isfinite(value):
      return False, f"non-finite reward {value}"
    return True, value
  except Exception as e:  # pylint: disable=broad-except
    return False, f"{type(e).__name__}: {e}"


class RewardRunner:
  """Scores batches with a weighted sum of reward functions.

  Args:
    fns: name -> (reward function, weight).
    timeout_s: per-item limit in seconds (not enforced when workers=0).
    workers: worker processes; 0 runs everything in this process (tests, debugging).
  """

  def __init__(self, fns: Mapping[str, tuple[RewardFn, float]], timeout_s: float = 5.0,
               workers: int = 2):
    if workers < 0 or timeout_s <= 0:
      raise ValueError(f"need workers >= 0 and timeout_s > 0, got {workers=} {timeout_s=}")
    self.fns = dict(fns)
    self.timeout_s = timeout_s
    self.workers = workers
    self._modules = sorted({_fn_module(fn) for fn, _ in self.fns.values()})
    self._pool = None

  # -- pool lifecycle -------------------------------------------------------

  def _start_pool(self) -> cf.ProcessPoolExecutor:
    pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_import_modules, initargs=(self._modules,))
    # Wait until every worker has started and imported the reward modules, so
    # start-up time is not charged to the first items.
    seen, deadline = set(), time.monotonic() + _STARTUP_TIMEOUT_S
    while len(seen) < self.workers:
      batch = [pool.submit(_warmup) for _ in range(self.workers)]
      seen.update(f.result(timeout=max(deadline - time.monotonic(), 0.1)) for f in batch)
    return pool

  def _kill_pool(self) -> None:
    if self._pool is None:
      return
    # ProcessPoolExecutor cannot stop a running call; kill the processes (private attr, py<3.14).
    for p in list(getattr(self._pool, "_processes", {}).values()):
      p.kill()
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._pool = None

  def close(self) -> None:
    self._kill_pool()

  def __del__(self):
    try:
      self._kill_pool()
    except Exception:  # pylint: disable=broad-except
      pass

  # -- scoring --------------------------------------------------------------

  def _run_pool(self, tasks: list[tuple]) -> tuple[list[float], list[str]]:
    """Runs `(fn, prompt, completion, reference)` tasks; (values, outcome per task)."""
    values, outcomes = [0.0] * len(tasks), ["ok"] * len(tasks)
    pending = list(range(len(tasks)))[::-1]  # stack, pops in order
    inflight: dict[cf.Future, tuple[int, float]] = {}  # future -> (task index, deadline)
    while pending or inflight:
      if self._pool is None:
        self._pool = self._start_pool()
      while pending and len(inflight) < self.workers:
        i = pending.pop()
        inflight[self._pool.submit(_call, *tasks[i])] = (i, time.monotonic() + self.timeout_s)
      wait_s = min(d for _, d in inflight.values()) - time.monotonic()
      done, _ = cf.wait(list(inflight), timeout=max(wait_s, 0.0), return_when=cf.FIRST_COMPLETED)
      for f in done:
        i, _ = inflight.pop(f)
        try:
          ok, out = f.result()
        except Exception as e:  # pylint: disable=broad-except  (e.g. a worker died)
          ok, out = False, f"{type(e).__name__}: {e}"
        if ok:
          values[i] = out
        else:
          outcomes[i] = "error"
          logging.warning("reward %s failed: %s", tasks[i][0], out)
      now = time.monotonic()
      expired = [f for f, (_, d) in inflight.items() if d <= now]
      if expired:
        for f in expired:
          outcomes[inflight.pop(f)[0]] = "timeout"
        # Rebuild the pool; the other in-flight items start again with fresh clocks.
        pending.extend(i for i, _ in inflight.values())
        inflight.clear()
        self._kill_pool()
    return values, outcomes

  def _run_inline(self, tasks: list[tuple]) -> tuple[list[float], list[str]]:
    results = [_call(*t) for t in tasks]
    values = [v if ok else 0.0 for ok, v in results]
    return values, ["ok" if ok else "error" for ok, _ in results]

  def score(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]
            ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
    """Scores N (prompt, completion, reference) triples.

    Returns:
      total_N: weighted sum of the rewards, float32[N].
      per_fn: name -> unweighted reward float32[N] (0 where it raised or timed out).
      stats: `rewards/<name>/{mean,errors,timeouts}` and `rewards/total/mean`.
    """
    n = len(completions)
    if not len(prompts) == len(references) == n:
      raise ValueError(f"lengths differ: {len(prompts)=} {n=} {len(references)=}")
    names = list(self.fns)
    tasks = [(self.fns[name][0], p, c, r) for name in names
             for p, c, r in zip(prompts, completions, references)]
    run = self._run_pool if self.workers else self._run_inline
    values, outcomes = run(tasks)
    per_fn, stats = {}, {}
    total_N = np.zeros(n, np.float32)
    for k, name in enumerate(names):
      sl = slice(k * n, (k + 1) * n)
      per_fn[name] = np.asarray(values[sl], np.float32)
      total_N += np.float32(self.fns[name][1]) * per_fn[name]
      stats[f"rewards/{name}/mean"] = float(per_fn[name].mean()) if n else 0.0
      stats[f"rewards/{name}/errors"] = outcomes[sl].count("error")
      stats[f"rewards/{name}/timeouts"] = outcomes[sl].count("timeout")
    stats["rewards/total/mean"] = float(total_N.mean()) if n else 0.0
    return total_N, per_fn, stats

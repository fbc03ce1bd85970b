"""R1-Zero's training dynamics in the tiny world, and two ablations (issue 11).

  python experiments/r1_zero_dynamics/run.py --workdir=/tmp/dynamics [--seed=0] [--lambda_ablation] [--smoke]

One base, pretrained with 10% self-correcting solutions (a wrong step, a
reflection such as "wait , let me check .", the fix), then three RL runs
from it, each a `python -m r1jax.main` process of configs/r1_zero.py:

- `grpo`: the tiny R1-Zero for twice the main job's steps (evaluated on all
  held-out problems at the half-way step and at the end);
- `ppo`: grpo.algorithm=ppo (a critic and GAE, lambda 1) for the half-way
  number of steps (with --lambda_ablation also `ppo_lam0.95`: GAE lambda 0.95);
- `curriculum`: GRPO with the adaptive curriculum and DAPO dynamic sampling,
  the half-way number of steps.

Writes WORKDIR/dynamics.png (length, reflection and per-level accuracy
against the step), WORKDIR/comparison.png (accuracy reward of the three runs)
and WORKDIR/table.md + results.json (pass@1 etc., wall time, memory). A run
whose results.json exists is not run again; delete it to rerun.
`--smoke` runs the same pipeline at seconds-scale (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SELF_CORRECT = 0.1  # share of reasoning documents in the corpus that self-correct


def _steps(smoke: bool) -> tuple[int, int]:
  """(steps of the compared runs, steps of the long GRPO run)."""
  return (2, 4) if smoke else (40, 80)


def runs(smoke: bool, lambda_ablation: bool = False) -> dict[str, list[str]]:
  """Each run's config overrides (besides preset, seed, base and workdir)."""
  half, full = _steps(smoke)
  out = {
      "grpo": [f"--config.grpo.num_steps={full}", f"--config.grpo.eval_every={half}",
               "--config.grpo.eval_num_problems=1000", f"--config.train.checkpoint_every={half}"],
      "ppo": [f"--config.grpo.num_steps={half}", "--config.grpo.algorithm=ppo",
              "--config.grpo.eval_every=0"],
      "ppo_lam0.95": [f"--config.grpo.num_steps={half}", "--config.grpo.algorithm=ppo",
                      "--config.ppo.lam=0.95", "--config.grpo.eval_every=0"],
      "curriculum": [f"--config.grpo.num_steps={half}", "--config.grpo.curriculum.mode=adaptive",
                     "--config.grpo.curriculum.threshold=0.5",
                     "--config.grpo.curriculum.min_steps_per_level=2",
                     "--config.grpo.curriculum.dynamic_sampling=True",
                     "--config.grpo.curriculum.max_rounds=3", "--config.grpo.eval_every=0"],
  }
  if smoke or not lambda_ablation:  # opt-in: 11 more minutes
    del out["ppo_lam0.95"]
  return out


def _run(args: list[str], log_path: str) -> float:
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.run([sys.executable, "-m", "r1jax.main", *args], cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log_path}")
  return time.perf_counter() - t0


def run_all(workdir: str, seed: int, smoke: bool, lambda_ablation: bool = False
            ) -> dict[str, float]:
  """Runs what is missing; returns the wall seconds of what ran."""
  preset = "smoke" if smoke else "tiny"
  base = os.path.join(workdir, "base")
  seconds = {}
  if not os.path.exists(os.path.join(base, "results.json")):
    print(f"pretraining the base into {base}", flush=True)
    seconds["base"] = _run(
        [f"--config={REPO}/configs/pretrain.py:{preset}", f"--workdir={base}",
         f"--config.seed={seed}", f"--config.data.self_correct_fraction={SELF_CORRECT}"]
        + (["--config.train.num_steps=10", "--config.eval.num_problems=8"] if smoke else []),
        os.path.join(workdir, "base.log"))
  for name, overrides in runs(smoke, lambda_ablation).items():
    out = os.path.join(workdir, name)
    if os.path.exists(os.path.join(out, "results.json")):
      continue
    print(f"{name}: {' '.join(overrides)}", flush=True)
    seconds[name] = _run(
        [f"--config={REPO}/configs/r1_zero.py:{preset}", f"--workdir={out}",
         f"--config.seed={seed}", f"--config.base_workdir={base}",
         f"--config.pretrain.data.self_correct_fraction={SELF_CORRECT}",
         "--config.train.progress_bar=False", *overrides], os.path.join(workdir, f"{name}.log"))
  return seconds


# ---------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------

def _rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _summary(rows: list[dict], upto: int, evaluation: dict, per_round: int) -> dict:
  """One table row: held-out figures + the first `upto` steps' cost
  (`per_round`: completions per round of prompts, prompts_per_step x G)."""
  kept = [r for r in rows if r["step"] <= upto]
  last = kept[-1]
  return {
      "steps": upto,
      "completions_sampled": int(sum(r.get("curriculum/rounds", 1) for r in kept) * per_round),
      "pass@1": evaluation.get("pass@1"), "cons@k": evaluation.get(
          next((k for k in evaluation if k.startswith("cons@")), ""), None),
      "format_rate": evaluation.get("format_rate"),
      "mean_length": evaluation.get("mean_completion_length"),
      "train_seconds": round(sum(r["time/sampling_s"] + r["time/training_s"] for r in kept), 1),
      "seconds_per_step": round(float(np.mean([r["time/sampling_s"] + r["time/training_s"]
                                               for r in kept])), 2),
      "state_mib": round(last["memory/state_mib"], 1),
      "peak_rss_mib": round(last["memory/peak_rss_mib"]),
      "reflection_rate_last10": round(float(np.mean([r["reflection/rate"]
                                                     for r in kept[-10:]])), 4),
  }


def _eval_at(rows: list[dict], step: int) -> dict:
  row = next(r for r in rows if r["step"] == step)
  return {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}


def analyse(workdir: str, smoke: bool) -> dict:
  half, full = _steps(smoke)
  load = lambda name: json.load(open(os.path.join(workdir, name, "results.json")))
  names = runs(smoke, lambda_ablation=True)  # every run that is there
  metrics = {name: _rows(os.path.join(workdir, name, "metrics.jsonl")) for name in names
             if os.path.exists(os.path.join(workdir, name, "results.json"))}
  grpo, ppo_run, cur = load("grpo"), load("ppo"), load("curriculum")
  gc = json.load(open(os.path.join(workdir, "grpo", "config.json")))["grpo"]
  per_round = gc["prompts_per_step"] * gc["num_generations"]
  table = {
      "base": dict(steps=0, **{k: grpo["before"].get(v) for k, v in (
          ("pass@1", "pass@1"), ("format_rate", "format_rate"),
          ("mean_length", "mean_completion_length"))}),
      f"grpo @{half}": _summary(metrics["grpo"], half, _eval_at(metrics["grpo"], half), per_round),
      f"grpo @{full}": _summary(metrics["grpo"], full, grpo["after"], per_round),
      f"ppo @{half}": _summary(metrics["ppo"], half, ppo_run["after"], per_round),
      f"curriculum @{half}": _summary(metrics["curriculum"], half, cur["after"], per_round),
  }
  if "ppo_lam0.95" in metrics:
    table[f"ppo lambda=0.95 @{half}"] = _summary(metrics["ppo_lam0.95"], half,
                                                 load("ppo_lam0.95")["after"], per_round)
  k = grpo["after"].get("num_samples", "k")
  cols = ["steps", "completions_sampled", "pass@1", "cons@k", "format_rate", "mean_length",
          "reflection_rate_last10", "train_seconds", "seconds_per_step", "state_mib",
          "peak_rss_mib"]
  lines = ["| run | " + " | ".join(c.replace("@k", f"@{k}") for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for name, row in table.items():
    cells = [row.get(c) for c in cols]
    lines.append(f"| {name} | " + " | ".join(
        "-" if v is None else str(v) if not isinstance(v, float) else f"{v:.3f}" if v < 10
        else f"{v:.1f}"
        for v in cells) + " |")
  md = "\n".join(lines)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(md + "\n")
  out = dict(table=table, dynamics=_dynamics(metrics["grpo"]),
             curriculum=[{k: r.get(k) for k in ("step", "curriculum/max_level",
                                                 "curriculum/rounds",
                                                 "curriculum/informative_groups")}
                         for r in metrics["curriculum"]])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  _plot(workdir, metrics)
  print(md)
  return out


def _dynamics(rows: list[dict]) -> dict:
  """Ten-step means of the self-evolution metrics of the long GRPO run."""
  keys = ["completions/length/mean", "completions/length/p90", "reflection/rate",
          "reflection/changed_answer_rate", "rewards/accuracy/mean"]
  keys += [f"accuracy/level_{lv}" for lv in (1, 2, 3, 4)]
  keys += [f"completions/length/level_{lv}/mean" for lv in (1, 2, 3, 4)]
  out = {}
  for lo in range(0, len(rows), 10):
    chunk = rows[lo:lo + 10]
    out[f"{chunk[0]['step']}-{chunk[-1]['step']}"] = {
        k: round(float(np.mean([r[k] for r in chunk if r.get(k) is not None])), 4)
        for k in keys if any(r.get(k) is not None for r in chunk)}
  return out


def _smooth(x: np.ndarray, w: int = 5) -> np.ndarray:
  w = min(w, len(x))
  return np.convolve(x, np.ones(w) / w, "valid") if w > 1 else x


def _plot(workdir: str, metrics: dict[str, list[dict]]) -> None:
  from matplotlib.figure import Figure  # a bare Figure: no global backend switch

  rows = metrics["grpo"]
  step = np.array([r["step"] for r in rows])
  series = lambda key: np.array([r.get(key, np.nan) for r in rows], np.float64)
  fig = Figure(figsize=(15, 3.6))
  axes = fig.subplots(1, 4)
  panels = [
      ("completion length (tokens)", [("mean", "completions/length/mean"),
                                      ("p50", "completions/length/p50"),
                                      ("p90", "completions/length/p90")]),
      ("mean length per level", [(f"L{lv}", f"completions/length/level_{lv}/mean")
                                 for lv in (1, 2, 3, 4)]),
      ("reflection", [("rate", "reflection/rate"),
                      ("changed answer", "reflection/changed_answer_rate")]),
      ("accuracy per level", [(f"L{lv}", f"accuracy/level_{lv}") for lv in (1, 2, 3, 4)]),
  ]
  for ax, (title, lines) in zip(axes, panels):
    for label, key in lines:
      y = series(key)
      ok = ~np.isnan(y)
      if ok.sum():
        sm = _smooth(y[ok])
        ax.plot(step[ok][len(step[ok]) - len(sm):], sm, label=label)
    ax.set_title(title)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("tiny R1-Zero (GRPO) from a base with self-correcting solutions; 5-step means")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "dynamics.png"), dpi=100)

  fig = Figure(figsize=(6, 3.6))
  ax = fig.subplots()
  for name, rs in metrics.items():
    half = min(len(rs), max(r["step"] for r in metrics["ppo"]))
    y = np.array([r.get("rewards/accuracy/mean", np.nan) for r in rs[:half]])
    sm = _smooth(y)
    ax.plot(np.arange(1, half + 1)[half - len(sm):], sm, label=name)
  ax.set_xlabel("step (same completions per step)")
  ax.set_title("training accuracy reward, 5-step means")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "comparison.png"), dpi=100)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="seconds-scale version (tests)")
  parser.add_argument("--lambda_ablation", action="store_true",
                      help="also PPO with GAE lambda 0.95 (~11 more minutes)")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.perf_counter()
  seconds = run_all(args.workdir, args.seed, args.smoke, args.lambda_ablation)
  analyse(args.workdir, args.smoke)
  seconds["total"] = time.perf_counter() - t0
  print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
  with open(os.path.join(args.workdir, "wall_seconds.json"), "w") as f:
    json.dump(seconds, f)


if __name__ == "__main__":
  main()

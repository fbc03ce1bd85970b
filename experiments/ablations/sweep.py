"""Ablation sweeps over the tiny R1-Zero: one config override varied, all else equal.

  python experiments/ablations/sweep.py --sweep=clip_higher --workdir=/tmp/ablations \
      [--base_workdir=/tmp/r1zero/base] [--steps=20] [--seed=0]

Each variant is `python -m r1jax.main --config=configs/r1_zero.py:tiny` from
the same base (pretrained into WORKDIR/base unless --base_workdir names one)
with the sweep's overrides and `--steps` GRPO steps. Writes
WORKDIR/<sweep>/table.md (held-out pass@1, cons@8, format, length; training
accuracy reward over the last 5 steps; seconds per step; state and peak
memory) and WORKDIR/<sweep>/curves.png (training accuracy reward per step).
A variant whose results.json exists is reused. Fork it: a sweep is a name and
a list of (label, overrides) in SWEEPS.
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

SWEEPS: dict[str, list[tuple[str, list[str]]]] = {
    # KL weight to the initial policy (R1 uses 0.001; DAPO and Dr.GRPO drop it).
    "beta": [("beta=0", ["--config.grpo.beta=0.0"]),
             ("beta=0.001", ["--config.grpo.beta=0.001"]),
             ("beta=0.04", ["--config.grpo.beta=0.04"])],
    # Group size G at a fixed number of completions per step (128).
    "group_size": [("G=4 x 32 prompts", ["--config.grpo.num_generations=4",
                                          "--config.grpo.prompts_per_step=32"]),
                   ("G=8 x 16 prompts", ["--config.grpo.num_generations=8",
                                          "--config.grpo.prompts_per_step=16"]),
                   ("G=16 x 8 prompts", ["--config.grpo.num_generations=16",
                                          "--config.grpo.prompts_per_step=8"])],
    # How per-token losses become one number (GRPO paper / DAPO / Dr.GRPO).
    "loss_aggregation": [
        ("seq_mean_token_mean (GRPO)", ["--config.grpo.loss_aggregation=seq_mean_token_mean"]),
        ("token_mean (DAPO)", ["--config.grpo.loss_aggregation=token_mean"]),
        ("seq_mean_token_sum_norm + no std (Dr.GRPO)",
         ["--config.grpo.loss_aggregation=seq_mean_token_sum_norm",
          "--config.grpo.scale_rewards=False"])],
    # The upper ratio clip (DAPO's clip-higher) with 2 updates per rollout, so
    # the ratio leaves 1 and the clip acts.
    "clip_higher": [("eps_high=0.2 (symmetric)", ["--config.grpo.epsilon_high=0.2"]),
                    ("eps_high=0.28 (DAPO)", ["--config.grpo.epsilon_high=0.28"]),
                    ("eps_high=0.4", ["--config.grpo.epsilon_high=0.4"])],
    # GRPO against PPO (a critic and GAE) at equal samples (DeepSeekMath §4.1).
    "algorithm": [("GRPO", ["--config.grpo.algorithm=grpo"]),
                  ("PPO", ["--config.grpo.algorithm=ppo"])],
}
COMMON = {"clip_higher": ["--config.grpo.updates_per_rollout=2"]}


def _slug(label: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "=._" else "_" for ch in label)[:48]


def _main(args: list[str], log: str) -> None:
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "r1jax.main", *args], cwd=REPO, stdout=f,
                          stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log}")


def run_sweep(sweep: str, workdir: str, base: str, steps: int, seed: int, preset: str) -> dict:
  out_dir = os.path.join(workdir, sweep)
  os.makedirs(out_dir, exist_ok=True)
  rows = {}
  for label, overrides in SWEEPS[sweep]:
    run_dir = os.path.join(out_dir, _slug(label))
    if not os.path.exists(os.path.join(run_dir, "results.json")):
      print(f"{sweep}: {label}", flush=True)
      _main([f"--config={REPO}/configs/r1_zero.py:{preset}", f"--workdir={run_dir}",
             f"--config.base_workdir={base}", f"--config.seed={seed}",
             f"--config.grpo.num_steps={steps}", "--config.grpo.eval_every=0",
             "--config.train.progress_bar=False", *COMMON.get(sweep, []), *overrides],
            run_dir + ".log")
    with open(os.path.join(run_dir, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      metrics = [json.loads(line) for line in f if line.strip()]
    after = results["after"]
    cons = next((k for k in after if k.startswith("cons@")), None)
    rows[label] = {
        "pass@1": after["pass@1"], "cons@k": after.get(cons),
        "format_rate": after.get("format_rate"), "mean_length": after.get("mean_completion_length"),
        "train_accuracy_last5": float(np.mean([m["rewards/accuracy/mean"] for m in metrics[-5:]])),
        "seconds_per_step": float(np.mean([m["time/sampling_s"] + m["time/training_s"]
                                           for m in metrics])),
        "state_mib": metrics[-1].get("memory/state_mib"),
        "peak_rss_mib": metrics[-1].get("memory/peak_rss_mib"),
        "curve": [m["rewards/accuracy/mean"] for m in metrics],
    }
  before = results["before"]["pass@1"]
  cols = ["pass@1", "cons@k", "format_rate", "mean_length", "train_accuracy_last5",
          "seconds_per_step", "state_mib", "peak_rss_mib"]
  lines = [f"{sweep}: {steps} GRPO steps from a base at pass@1 {before:.3f} (seed {seed})", "",
           "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for label, r in rows.items():
    lines.append(f"| {label} | " + " | ".join(
        "-" if r[c] is None else f"{r[c]:.3f}" if r[c] < 10 else f"{r[c]:.0f}" for c in cols)
        + " |")
  md = "\n".join(lines)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(sweep=sweep, steps=steps, seed=seed, base_pass1=before, rows=rows), f, indent=1)
  _plot(rows, os.path.join(out_dir, "curves.png"), sweep)
  print(md)
  return rows


def _plot(rows: dict, path: str, title: str) -> None:
  from matplotlib.figure import Figure  # a bare Figure: no global backend switch
  fig = Figure(figsize=(6, 3.6))
  ax = fig.subplots()
  for label, r in rows.items():
    y = np.asarray(r["curve"])
    w = min(5, len(y))
    sm = np.convolve(y, np.ones(w) / w, "valid")
    ax.plot(np.arange(len(y) - len(sm) + 1, len(y) + 1), sm, label=f"{label} ({r['pass@1']:.2f})")
  ax.set_xlabel("GRPO step")
  ax.set_ylabel("training accuracy reward (5-step mean)")
  ax.set_title(f"{title} (held-out pass@1 in the legend)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sweep", required=True, help=f"one of {', '.join(SWEEPS)} or 'all'")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--base_workdir", default="", help="a pretrained tiny base (else pretrained)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--preset", default="tiny", help="configs/r1_zero.py preset (smoke: tests)")
  args = parser.parse_args(argv)
  sweeps = list(SWEEPS) if args.sweep == "all" else args.sweep.split(",")
  if unknown := [s for s in sweeps if s not in SWEEPS]:
    parser.error(f"unknown sweep(s) {unknown}; known: {', '.join(SWEEPS)}")
  base = args.base_workdir or os.path.join(args.workdir, "base")
  if not os.path.exists(os.path.join(base, "results.json")):
    print(f"pretraining the base into {base}", flush=True)
    pretrain = "smoke" if args.preset == "smoke" else "tiny"
    _main([f"--config={REPO}/configs/pretrain.py:{pretrain}", f"--workdir={base}",
           f"--config.seed={args.seed}"], os.path.join(args.workdir, "base.log"))
  t0 = time.perf_counter()
  for sweep in sweeps:
    run_sweep(sweep, args.workdir, base, args.steps, args.seed, args.preset)
  print(f"wall: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()

"""R1-Zero, R1 and the distilled students in the tiny world, one table (issue 7).

  python experiments/r1_tiny/run.py --workdir=/tmp/r1_tiny [--seeds=0,1]
      [--bases=shared|per_seed] [--smoke]

Per seed, three `python -m r1jax.main` runs:
1. configs/r1.py:tiny -> SEED/r1: the base, R1-Zero (GRPO from the base), then
   R1's four stages (cold start, reasoning RL, rejection-sampling SFT,
   all-scenario RL);
2. configs/distill.py:tiny -> SEED/distill: the student base (2 layers, the
   teacher's tokenizer) and its SFT on R1's rejection-sampled data;
3. configs/r1_zero.py:tiny-student -> SEED/student_rl: the same student base
   trained with GRPO only (as many RL steps as R1-Zero).

With --bases=shared (the default) only the first seed pretrains the teacher
and student bases; the other seeds start every post-training stage (R1-Zero,
the four R1 stages, distillation, the RL-only student) from them with their
own seed. --bases=per_seed pretrains both bases per seed too.

Writes WORKDIR/table.md and WORKDIR/results.json (rows x seeds, and the
paper's four findings checked per seed). A run whose results.json exists is
reused. `--smoke` runs the pipeline at seconds-scale (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# format_rate checks R1-Zero's `<think> ... </think> <answer> ... </answer>`;
# summary_format_rate R1's readable one (a summary between the two).
COLUMNS = ("pass@1", "cons@{k}", "format_rate", "summary_format_rate", "language_consistency",
           "mean_completion_length")
R1_STAGES = ("cold_start", "reasoning_rl", "rejection_sft", "all_scenario_rl")


def _main(config: str, workdir: str, log: str, *flags: str) -> float:
  """One r1jax.main run unless its results.json exists; wall seconds (0 if reused)."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return 0.0
  t0 = time.perf_counter()
  print(f"{config} -> {workdir}", flush=True)
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", "r1jax.main", f"--config={REPO}/{config}",
                           f"--workdir={workdir}", "--config.train.progress_bar=False", *flags],
                          cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"{config} failed ({proc.returncode}); see {log}")
  return time.perf_counter() - t0


def bases(workdir: str, seed: int) -> tuple[str, str]:
  """(teacher base, student base) directories that seed `seed`'s runs pretrain."""
  d = os.path.join(workdir, f"seed{seed}")
  return os.path.join(d, "r1", "r1_zero", "base"), os.path.join(d, "distill", "student_base")


def run_seed(workdir: str, seed: int, smoke: bool, base_seed: int | None = None
             ) -> dict[str, float]:
  """Seed `seed`'s three runs; `base_seed` (another seed, already run) lends its
  pretrained teacher and student bases instead of pretraining new ones."""
  preset = "smoke" if smoke else "tiny"
  d = os.path.join(workdir, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  r1, dist, srl = (os.path.join(d, n) for n in ("r1", "distill", "student_rl"))
  s = f"--config.seed={seed}"
  teacher_base, student_base = bases(workdir, seed if base_seed is None else base_seed)
  shared = base_seed is not None and base_seed != seed
  seconds = {"r1": _main(f"configs/r1.py:{preset}", r1, os.path.join(d, "r1.log"), s,
                         *([f"--config.base_workdir={teacher_base}"] if shared else []))}
  seconds["distill"] = _main(f"configs/distill.py:{preset}", dist, os.path.join(d, "distill.log"),
                             s, f"--config.teacher_workdir={r1}",
                             *([f"--config.student_base_workdir={student_base}"] if shared else []))
  student = "smoke" if smoke else "tiny-student"
  seconds["student_rl"] = _main(f"configs/r1_zero.py:{student}", srl,
                                os.path.join(d, "student_rl.log"), s,
                                f"--config.base_workdir={student_base}")
  return seconds


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def seed_table(d: str) -> tuple[dict, dict]:
  """(rows: name -> figures, the paper's four findings checked) for one seed's runs."""
  r1 = _load(os.path.join(d, "r1", "results.json"))
  dist = _load(os.path.join(d, "distill", "results.json"))
  srl = _load(os.path.join(d, "student_rl", "results.json"))
  k = dist["after"].get("num_samples", 8)
  row = lambda res: {c.format(k=k): res.get(c.format(k=k)) for c in COLUMNS}
  rows = {"base": row(r1["table"]["base"]), "r1_zero": row(r1["table"]["r1_zero"])}
  rows.update({f"r1/{n}": row(r1["table"][n]) for n in R1_STAGES if n in r1["table"]})
  rows.update({"student base": row(dist["before"]), "student distilled": row(dist["after"]),
               "student RL-only": row(srl["after"])})
  rm = r1["stages"]["all_scenario_rl"]["reward_model"]["heldout_pair_accuracy"]
  lang = "language_consistency"
  checks = {
      "R1 stages 2-4 language >= 0.95": all(rows[f"r1/{n}"][lang] >= 0.95 for n in R1_STAGES[1:]),
      "R1-Zero language clearly lower (< 0.9)": rows["r1_zero"][lang] < 0.9,
      "cold start + RL > RL from base (same RL steps)":
          rows["r1/reasoning_rl"]["pass@1"] > rows["r1_zero"]["pass@1"],
      "distilled student > RL-only student":
          rows["student distilled"]["pass@1"] > rows["student RL-only"]["pass@1"],
      "reward model held-out pair accuracy >= 0.8": rm >= 0.8,
  }
  zres = _load(os.path.join(r1["r1_zero_workdir"], "results.json"))
  seconds = {  # what each part took when it ran (a shared base: only where it was pretrained)
      "base": zres["seconds"]["base"], "r1_zero": zres["seconds"]["total"] - zres["seconds"]["base"],
      **{f"r1/{n}": r1["stages"][n]["seconds"] for n in R1_STAGES if n in r1["stages"]},
      "student base": dist["seconds"].get("base", 0.0),
      "distill": dist["seconds"]["total"] - dist["seconds"].get("base", 0.0),
      "student RL-only": srl["seconds"]["total"]}
  return rows, dict(checks=checks, reward_model_accuracy=rm, seconds=seconds,
                    total_minutes=round(sum(seconds.values()) / 60, 1),
                    rl_steps=dict(r1_zero=zres["grpo_steps"],
                        student_rl=srl["grpo_steps"]),
                    distill_examples=dist["data"]["examples"], distill_steps=dist["sft_steps"])


def write_table(workdir: str, seeds: list[int]) -> dict:
  out, lines = {}, []
  for seed in seeds:
    rows, info = seed_table(os.path.join(workdir, f"seed{seed}"))
    out[seed] = dict(rows=rows, **info)
    cols = list(next(iter(rows.values())))
    if not lines:
      lines += ["| seed | model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, r in rows.items():
      lines.append(f"| {seed} | {name} | " + " | ".join(
          "-" if r.get(c) is None else f"{r[c]:.3f}" if r[c] < 10 else f"{r[c]:.1f}"
          for c in cols) + " |")
  lines.append("")
  for seed in seeds:
    for what, ok in out[seed]["checks"].items():
      lines.append(f"- seed {seed}: {what}: {'yes' if ok else 'NO'}")
    lines.append(f"- seed {seed}: reward model held-out pair accuracy "
                 f"{out[seed]['reward_model_accuracy']:.3f}")
    lines.append(f"- seed {seed}: {out[seed]['total_minutes']} min (" + ", ".join(
        f"{k} {v / 60:.1f}" for k, v in out[seed]["seconds"].items()) + ")")
  md = "\n".join(lines)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(md)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--bases", choices=("shared", "per_seed"), default="shared",
                      help="shared: the first seed pretrains the teacher and student bases and "
                           "the others post-train from them (seeds vary every post-training "
                           "stage); per_seed: each seed pretrains its own (about 23 min more "
                           "per seed)")
  parser.add_argument("--smoke", action="store_true", help="seconds-scale version (tests)")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.perf_counter()
  base_seed = seeds[0] if args.bases == "shared" else None
  seconds = {seed: run_seed(args.workdir, seed, args.smoke, base_seed) for seed in seeds}
  write_table(args.workdir, seeds)
  print(f"wall: {time.perf_counter() - t0:.0f} s ({json.dumps(seconds)})")


if __name__ == "__main__":
  main()

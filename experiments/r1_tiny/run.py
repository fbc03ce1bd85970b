"""R1-Zero, R1 and the distilled students in the tiny world, one table (issue 7).

  python experiments/r1_tiny/run.py --workdir=/tmp/r1_tiny [--seeds=0,1]
      [--bases=shared|per_seed] [--jobs=2] [--smoke]

Per seed, three `python -m r1jax.main` runs:
1. configs/r1.py:tiny -> SEED/r1: R1-Zero (GRPO from the base), then R1's four
   stages (cold start, reasoning RL, rejection-sampling SFT, all-scenario RL);
2. configs/distill.py:tiny -> SEED/distill: the student (2 layers, the
   teacher's tokenizer) SFT-ed on R1's rejection-sampled data;
3. configs/r1_zero.py:tiny-student -> SEED/student_rl: the same student base
   trained with GRPO only (as many RL steps as R1-Zero).

The two bases are pretrained first, as tasks of their own: the tokenizer
(SEED/r1/r1_zero/base/tokenizer.model), then the teacher's base
(SEED/r1/r1_zero/base) and the student's (SEED/distill/student_base), each
with exactly the config its r1 / distill run would pretrain it with. With
--bases=shared (the default) only the first seed pretrains them and the
other seeds start every post-training stage from them with their own seed;
--bases=per_seed pretrains both for every seed.

The tasks run --jobs at a time as their inputs become ready. Sampling, most
of every stage's time, keeps one core busy, so a 2-core machine runs two
jobs: the two-seed run took 71 min wall for 139 min of task time. Each task
logs to SEED/<task>.log; a task whose results.json exists is reused.

Writes WORKDIR/table.md and WORKDIR/results.json (rows x seeds, the paper's
four findings checked per seed, and the wall time). `--smoke` runs the
pipeline at seconds-scale (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# format_rate checks R1-Zero's `<think> ... </think> <answer> ... </answer>`;
# summary_format_rate R1's readable one (a summary between the two).
COLUMNS = ("pass@1", "cons@{k}", "format_rate", "summary_format_rate", "language_consistency",
           "mean_completion_length")
R1_STAGES = ("cold_start", "reasoning_rl", "rejection_sft", "all_scenario_rl")
BASES = ("tokenizer", "teacher", "student")


class Task(NamedTuple):
  name: str  # "seed0/r1", "seed0/teacher base", ...
  argv: list[str]  # the command
  done: str  # the file whose presence means the task has finished
  log: str
  deps: tuple[str, ...] = ()  # names of the tasks it needs finished


def base_dirs(workdir: str, seed: int) -> tuple[str, str]:
  """(teacher base, student base) directories that seed `seed` pretrains."""
  d = os.path.join(workdir, f"seed{seed}")
  return os.path.join(d, "r1", "r1_zero", "base"), os.path.join(d, "distill", "student_base")


def plan(workdir: str, seeds: list[int], smoke: bool, bases: str = "shared") -> list[Task]:
  """Every task of the run, each after the tasks it depends on."""
  preset = "smoke" if smoke else "tiny"
  owners = seeds[:1] if bases == "shared" else seeds  # the seeds that pretrain bases
  tasks = []
  for seed in owners:
    d = os.path.join(workdir, f"seed{seed}")
    teacher, student = base_dirs(workdir, seed)
    done = {"tokenizer": os.path.join(teacher, "tokenizer.model"),
            "teacher": os.path.join(teacher, "results.json"),
            "student": os.path.join(student, "results.json")}
    names = {"tokenizer": f"seed{seed}/tokenizer", "teacher": f"seed{seed}/teacher base",
             "student": f"seed{seed}/student base"}
    for what in BASES:
      argv = [sys.executable, os.path.abspath(__file__), f"--pretrain_base={what}",
              f"--workdir={workdir}", f"--seeds={seed}", *(["--smoke"] if smoke else [])]
      tasks.append(Task(names[what], argv, done[what], os.path.join(d, f"{what}_base.log"),
                        () if what == "tokenizer" else (names["tokenizer"],)))

  def main(config, run_dir, *flags):
    return [sys.executable, "-m", "r1jax.main", f"--config={REPO}/{config}",
            f"--workdir={run_dir}", "--config.train.progress_bar=False", *flags]

  r1_runs, distills, students = [], [], []
  for seed in seeds:
    d = os.path.join(workdir, f"seed{seed}")
    owner = seed if seed in owners else owners[0]
    teacher, student = base_dirs(workdir, owner)
    shared = owner != seed
    r1, dist, srl = (os.path.join(d, n) for n in ("r1", "distill", "student_rl"))
    s = f"--config.seed={seed}"
    tb, sb = f"seed{owner}/teacher base", f"seed{owner}/student base"
    r1_runs.append(Task(f"seed{seed}/r1", main(
        f"configs/r1.py:{preset}", r1, s, *([f"--config.base_workdir={teacher}"] if shared else [])),
        os.path.join(r1, "results.json"), os.path.join(d, "r1.log"), (tb,)))
    distills.append(Task(f"seed{seed}/distill", main(
        f"configs/distill.py:{preset}", dist, s, f"--config.teacher_workdir={r1}",
        *([f"--config.student_base_workdir={student}"] if shared else [])),
        os.path.join(dist, "results.json"), os.path.join(d, "distill.log"),
        (f"seed{seed}/r1", sb)))
    students.append(Task(f"seed{seed}/student_rl", main(
        f"configs/r1_zero.py:{'smoke' if smoke else 'tiny-student'}", srl, s,
        f"--config.base_workdir={student}"),
        os.path.join(srl, "results.json"), os.path.join(d, "student_rl.log"), (sb,)))
  # The long R1 runs of all seeds first, then distillation, then the RL-only students.
  return tasks + r1_runs + distills + students


def pretrain_base(what: str, workdir: str, seed: int, smoke: bool) -> None:
  """One base task of `plan` (run as its own process): the tokenizer, or the
  teacher's or the student's base, from the config its r1 / distill run loads."""
  from r1jax.config_files import load_config
  from r1jax.stages import distill, pretrain, r1_zero
  preset = "smoke" if smoke else "tiny"
  teacher_dir, _ = base_dirs(workdir, seed)
  teacher = load_config(os.path.join(REPO, "configs", f"r1.py:{preset}"))
  teacher.seed = seed
  if what == "tokenizer":
    os.makedirs(teacher_dir, exist_ok=True)
    pretrain.tokenizer_for(teacher.pretrain, teacher_dir, pretrain.corpus(teacher.pretrain.data))
  elif what == "teacher":
    r1_zero.pretrain_base(teacher, os.path.dirname(teacher_dir))
  else:
    student = load_config(os.path.join(REPO, "configs", f"distill.py:{preset}"))
    student.seed = seed
    distill.student_base(student, os.path.join(workdir, f"seed{seed}", "distill"),
                         tokenizer=os.path.join(teacher_dir, "tokenizer.model"))


def schedule(tasks: list[Task], jobs: int, poll_s: float = 0.5) -> dict[str, float]:
  """Runs `tasks`, up to `jobs` at a time, each once its deps have finished, in
  list order among the ready ones; {name: wall seconds} (0 = reused). A failed
  task starts nothing new; the running ones finish, then SystemExit names its log."""
  t0 = time.perf_counter()
  stamp = lambda: f"[{(time.perf_counter() - t0) / 60:5.1f} min]"
  seconds = {t.name: 0.0 for t in tasks if os.path.exists(t.done)}
  pending = [t for t in tasks if t.name not in seconds]
  running: dict[str, tuple[subprocess.Popen, float, Task]] = {}
  failed = []
  while pending or running:
    for name, (proc, start, task) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[name]
      if proc.returncode:
        failed.append(task)
        print(f"{stamp()} FAILED {name} (exit {proc.returncode}); see {task.log}", flush=True)
      else:
        seconds[name] = time.perf_counter() - start
        print(f"{stamp()} done {name} in {seconds[name] / 60:.1f} min", flush=True)
    ready = [t for t in pending if all(d in seconds for d in t.deps)]
    while not failed and ready and len(running) < jobs:
      task = ready.pop(0)
      pending.remove(task)
      os.makedirs(os.path.dirname(task.log), exist_ok=True)
      with open(task.log, "w") as log:
        proc = subprocess.Popen(task.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
      running[task.name] = (proc, time.perf_counter(), task)
      print(f"{stamp()} start {task.name} (log {task.log})", flush=True)
    if failed and not running:
      break
    if not running and pending:  # nothing can start: a dependency is missing from `tasks`
      raise SystemExit(f"tasks {[t.name for t in pending]} wait on tasks that never run")
    time.sleep(poll_s)
  if failed:
    raise SystemExit("failed: " + ", ".join(f"{t.name} (see {t.log})" for t in failed))
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

  def base_seconds(base_dir):  # a base pretrained by this seed (0 = another seed's)
    if not os.path.abspath(base_dir).startswith(os.path.abspath(d) + os.sep):
      return 0.0
    return sum(_load(os.path.join(base_dir, "results.json"))["seconds"].values())

  seconds = {  # what each part took when it ran
      "base": base_seconds(zres["base_workdir"]),
      "r1_zero": zres["seconds"]["total"] - zres["seconds"]["base"],
      **{f"r1/{n}": r1["stages"][n]["seconds"] for n in R1_STAGES if n in r1["stages"]},
      "student base": base_seconds(dist["student_base_workdir"]),
      "distill": dist["seconds"]["total"] - dist["seconds"].get("base", 0.0),
      "student RL-only": srl["seconds"]["total"]}
  return rows, dict(checks=checks, reward_model_accuracy=rm, seconds=seconds,
                    total_minutes=round(sum(seconds.values()) / 60, 1),
                    rl_steps=dict(r1_zero=zres["grpo_steps"],
                        student_rl=srl["grpo_steps"]),
                    distill_examples=dist["data"]["examples"], distill_steps=dist["sft_steps"])


def write_table(workdir: str, seeds: list[int], wall: dict | None = None) -> dict:
  """table.md and results.json; `wall` = {"seconds", "jobs", "ran", "tasks",
  "task_seconds"} of the invocation that produced them."""
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
    lines.append(f"- seed {seed}: {out[seed]['total_minutes']} min of parts (" + ", ".join(
        f"{k} {v / 60:.1f}" for k, v in out[seed]["seconds"].items()) + ")")
  if wall:
    out["wall"] = wall
    lines.append(f"- wall clock: {wall['seconds'] / 60:.1f} min with --jobs={wall['jobs']} "
                 f"({wall['ran']} of {wall['tasks']} tasks ran, the others were reused)")
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
  parser.add_argument("--jobs", type=int, default=2,
                      help="tasks run at once (one per core: sampling is single-threaded)")
  parser.add_argument("--smoke", action="store_true", help="seconds-scale version (tests)")
  parser.add_argument("--pretrain_base", choices=BASES, help=argparse.SUPPRESS)  # one base task
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if args.pretrain_base:
    return pretrain_base(args.pretrain_base, args.workdir, seeds[0], args.smoke)
  if args.jobs < 1:
    parser.error("--jobs must be at least 1")
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.perf_counter()
  tasks = plan(args.workdir, seeds, args.smoke, args.bases)
  seconds = schedule(tasks, args.jobs)
  wall = dict(seconds=round(time.perf_counter() - t0, 1), jobs=args.jobs,
              ran=sum(v > 0 for v in seconds.values()), tasks=len(tasks),
              task_seconds={k: round(v, 1) for k, v in seconds.items()})
  write_table(args.workdir, seeds, wall)


if __name__ == "__main__":
  main()

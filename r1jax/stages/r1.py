"""The R1 pipeline in the tiny world (design.md §1): cold start -> reasoning RL
-> rejection-sampling SFT -> all-scenario RL, from an R1-Zero run.

  WORKDIR/r1_zero/          the R1-Zero run the stages start from (its base too),
                            run here unless `config.r1_zero_workdir` names one
  WORKDIR/cold_start/       data/ (the readable long-CoT examples + stats), SFT of the base
  WORKDIR/reasoning_rl/     GRPO + language-consistency reward from the cold start
  WORKDIR/rejection_sft/    data/ (filtered samples of stage 2 + non-reasoning mix), SFT of the base
  WORKDIR/all_scenario_rl/  rm/ (reward model on helpfulness pairs), GRPO with rule + model rewards
  WORKDIR/results.json      one row per model: pass@1, cons@k, format, language, length

Each stage writes its own results.json and checkpoints and is skipped when
its results.json exists, so a killed pipeline re-run with the same command
goes on where it stopped; `config.stages` runs a subset (each stage needs the
previous one's params).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax.checkpoint.manager import restore_model
from r1jax.data import rejection, tinyworld, tinyworld_r1
from r1jax.data.packing import PackedDataset, pack_examples
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tokenizer import load_tokenizer
from r1jax.errors import ConfigError
from r1jax.eval.runner import evaluate, generate, write_results
from r1jax.models.build import build_model
from r1jax.models.reward_model import RewardModel, init_from_policy
from r1jax.parallel.mesh import make_mesh
from r1jax.rewards import accuracy_reward_fn, language_consistency_reward_fn
from r1jax.rewards.accuracy import accuracy_reward
from r1jax.rewards.format import summary_format_reward_fn
from r1jax.stages import r1_zero
from r1jax.trainers import grpo, reward_model, sft
from r1jax.trainers.optim import make_optimizer

STAGES = ("cold_start", "reasoning_rl", "rejection_sft", "all_scenario_rl")
# The table's columns (results.json "table").
COLUMNS = ("pass@1", "cons@{k}", "format_rate", "summary_format_rate", "language_consistency",
           "mean_completion_length")


# ---------------------------------------------------------------------------
# Params of a finished run: its latest checkpoint (SFT, GRPO or R1-Zero alike).
# ---------------------------------------------------------------------------

def load_params(run_dir: str, like_params: Any, like_model_state: Any) -> tuple[Any, Any]:
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
  params, model_state, _ = restore_model(os.path.join(run_dir, "checkpoints"),
                                         abstract(like_params),
                                         abstract(like_model_state) or None)
  return params, model_state


# ---------------------------------------------------------------------------
# Shared context.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  mesh: Any
  tokenizer: Any
  base: tuple  # (params, model_state) of the pretrained base
  r1_zero: tuple  # (params, model_state) after R1-Zero
  heldout: list  # evaluation problems


def _sub(config: ml_collections.ConfigDict, **sections) -> ml_collections.ConfigDict:
  """A copy of `config` with sections replaced/updated (stage-specific trainer configs)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for name, value in sections.items():
    if isinstance(value, dict) and name in c and isinstance(c[name], ml_collections.ConfigDict):
      c[name].update(value)
    else:
      c[name] = value
  return c


def evaluate_stage(ctx: Context, name: str, params, model_state, out_dir: str) -> dict:
  ec = ctx.config.eval
  path = os.path.join(out_dir, "eval_samples.jsonl")
  if os.path.exists(path):
    os.replace(path, path + ".prev")
  return evaluate(ctx.model, params, ctx.tokenizer, ctx.heldout, r1_zero_prompt, ec,
                  jax.random.key(ec.seed), samples_path=path, model_state=model_state)


def _sample_train(ctx: Context, params, model_state, sc: ml_collections.ConfigDict, seed: int):
  """`sc.num_problems` train problems and `sc.num_samples` completions of each."""
  problems = tinyworld.generate_problems("train", sc.num_problems, seed,
                                         tuple(ctx.config.grpo.levels))
  prompts = [ctx.tokenizer.encode(r1_zero_prompt(p.question)) for p in problems]
  ec = _sub(ctx.config.eval, num_samples=sc.num_samples, temperature=sc.temperature, top_p=1.0)
  out, _ = generate(ctx.model, params, ctx.tokenizer, prompts, ec, jax.random.key(seed),
                    greedy=False, model_state=model_state)
  k = sc.num_samples
  return problems, [[t for t, _ in out[i * k:(i + 1) * k]] for i in range(len(problems))]


def _sft(ctx: Context, out_dir: str, examples: list[tuple[str, str]], sc: ml_collections.ConfigDict,
         init: tuple) -> tuple[Any, Any]:
  """SFT of `init` on (prompt, completion) pairs: loss on the completions only."""
  dataset = PackedDataset(pack_examples(ctx.tokenizer, examples, sc.seq_len), sc.batch_size,
                          ctx.config.seed)
  cfg = _sub(ctx.config, name=f"{ctx.config.name}-{os.path.basename(out_dir)}",
             train=dict(num_steps=sc.num_steps), optim=dict(sc.optim))
  tx = make_optimizer(cfg.optim, sc.num_steps)
  state = sft.train(cfg, out_dir, model=ctx.model, dataset=dataset, mesh=ctx.mesh, tx=tx,
                    init_params=jax.tree.map(jnp.copy, init[0]),
                    init_model_state=jax.tree.map(jnp.copy, init[1]))
  return state.params, state.model_state


def _grpo(ctx: Context, out_dir: str, init: tuple, rc: ml_collections.ConfigDict,
          rewards: dict, model_rewards: dict | None = None) -> tuple[Any, Any]:
  cfg = _sub(ctx.config, name=f"{ctx.config.name}-{os.path.basename(out_dir)}",
             grpo=dict(num_steps=rc.num_steps),
             optim=dict(learning_rate=rc.get("learning_rate") or ctx.config.optim.learning_rate))
  tx = make_optimizer(cfg.optim, cfg.grpo.num_steps * grpo.updates_per_step(cfg.grpo))
  state = grpo.train(cfg, out_dir, model=ctx.model, tokenizer=ctx.tokenizer, mesh=ctx.mesh,
                     tx=tx, init_params=jax.tree.map(jnp.copy, init[0]),
                     init_model_state=jax.tree.map(jnp.copy, init[1]), rewards=rewards,
                     model_rewards=model_rewards)
  return state.params, state.model_state


def _fill_with_references(kept: list, problems: list, minimum: int) -> list:
  """Reference solutions in the readable format for the first problems, so that at
  least `minimum` examples exist (the smoke preset's random policy solves nothing;
  the tiny preset sets 0). Counted in the stats as filled_with_references."""
  return [rejection.Candidate(p.uid, r1_zero_prompt(p.question),
                              tinyworld_r1.render_readable(p.steps, p.answer, p.lang), True,
                              p.lang, source="reference")
          for p in problems[:max(0, minimum - len(kept))]]


def _rule_rewards(config) -> dict:
  """R1 stage 2's rewards: accuracy, the readable format and language consistency."""
  g = config.grpo
  return {"accuracy": (accuracy_reward_fn, g.accuracy_weight),
          "format": (summary_format_reward_fn, g.format_weight),
          "language": (language_consistency_reward_fn, config.reasoning_rl.language_weight)}


# ---------------------------------------------------------------------------
# Stages: each returns (params, model_state, extra results).
# ---------------------------------------------------------------------------

def cold_start(ctx: Context, out_dir: str):
  """Samples of the R1-Zero policy on train problems, kept when correct and
  rewritable into the readable format in the question's language, capped per
  problem; SFT of the *base* on them."""
  cc = ctx.config.cold_start
  problems, samples = _sample_train(ctx, *ctx.r1_zero, cc, ctx.config.seed * 7919 + 1)
  candidates, unreadable = [], 0
  for p, texts in zip(problems, samples):
    for t in texts:
      correct = bool(accuracy_reward(t, p.answer))
      rewritten = tinyworld_r1.readable(t, p.lang) if correct else None
      if correct and rewritten is None:  # right, but no parseable step-by-step reasoning
        unreadable += 1
        continue
      candidates.append(rejection.Candidate(p.uid, r1_zero_prompt(p.question),
                                            rewritten or t, correct, p.lang))
  kept, stats = rejection.select(candidates, rejection.FilterConfig(
      max_per_prompt=cc.max_per_problem, max_paragraph_words=10_000))
  kept = kept[:cc.max_examples]
  filled = _fill_with_references(kept, problems, cc.get("min_examples", 0))
  stats.update(unreadable=unreadable, sampled=sum(map(len, samples)), used=len(kept) + len(filled),
               filled_with_references=len(filled))
  kept += filled
  rejection.write_dataset(os.path.join(out_dir, "data"), kept, stats)
  if not kept:
    raise RuntimeError(f"cold start: no usable R1-Zero samples ({stats})")
  params = _sft(ctx, out_dir, [(c.prompt, c.completion) for c in kept], cc.sft, ctx.base)
  return (*params, {"data": stats})


def reasoning_rl(ctx: Context, out_dir: str, init: tuple):
  """R1-Zero's GRPO plus the language-consistency reward, from the cold start."""
  params = _grpo(ctx, out_dir, init, ctx.config.reasoning_rl, _rule_rewards(ctx.config))
  return (*params, {})


def rejection_sft(ctx: Context, out_dir: str, init: tuple):
  """Samples of the stage-2 policy, filtered (correct, one language, no long
  paragraph or code, deduplicated, capped), mixed with non-reasoning data;
  SFT of the *base* on the mix."""
  rc = ctx.config.rejection
  problems, samples = _sample_train(ctx, *init, rc, ctx.config.seed * 7919 + 3)
  candidates = [rejection.Candidate(p.uid, r1_zero_prompt(p.question), t,
                                    bool(accuracy_reward(t, p.answer)), p.lang)
                for p, texts in zip(problems, samples) for t in texts]
  filters = rejection.FilterConfig(**rc.filters)
  kept, stats = rejection.select(candidates, filters)
  filled = _fill_with_references(kept, problems, rc.get("min_examples", 0))
  stats["filled_with_references"] = len(filled)
  kept += filled
  extra = tinyworld_r1.translation_examples(int(round(rc.non_reasoning_fraction * len(kept))),
                                            ctx.config.seed)
  rejection.write_dataset(os.path.join(out_dir, "data"), kept, stats, non_reasoning=extra)
  if not kept:
    raise RuntimeError(f"rejection sampling kept nothing ({stats})")
  examples = [(c.prompt, c.completion) for c in kept] + extra
  params = _sft(ctx, out_dir, examples, rc.sft, ctx.base)
  return (*params, {"data": dict(stats, non_reasoning=len(extra))})


def all_scenario_rl(ctx: Context, out_dir: str, init: tuple):
  """A reward model for helpfulness (trained on pairs judged on the summary),
  then GRPO with the rule rewards plus the reward model's score of each
  completion's summary."""
  ac = ctx.config.all_scenario
  seed = ctx.config.seed
  pairs = [reward_model.Pair(**r) for r in tinyworld_r1.helpfulness_pairs(
      tinyworld.generate_problems("train", ac.num_pairs, seed * 7919 + 5), seed)]
  held = [reward_model.Pair(**r) for r in tinyworld_r1.helpfulness_pairs(
      tinyworld.generate_problems("heldout", ac.num_heldout_pairs, seed * 7919 + 6), seed + 1)]
  rm_dir = os.path.join(out_dir, "rm")
  reward_model.write_pairs(os.path.join(out_dir, "pairs.jsonl"), pairs)
  rm_model = RewardModel(ctx.model)
  rm_cfg = _sub(ctx.config, name=f"{ctx.config.name}-rm",
                train=dict(num_steps=ac.rm_steps), rm=dict(ac.rm))
  tx = make_optimizer(_sub(ctx.config.optim, **ac.rm_optim), ac.rm_steps)
  d = getattr(ctx.model.config, "hidden_size")
  rm_state = reward_model.train(rm_cfg, rm_dir, model=rm_model, tokenizer=ctx.tokenizer,
                                pairs=pairs, mesh=ctx.mesh, tx=tx,
                                init_params=init_from_policy(ctx.base[0], d))
  held_arrays = reward_model.pair_arrays(ctx.tokenizer, held, ac.rm.max_length)
  rm_accuracy = reward_model.pair_accuracy(rm_model, rm_state.params, held_arrays)
  scorer = reward_model.RewardModelScorer(rm_model, rm_state.params, ctx.tokenizer,
                                          max_length=ac.rm.max_length)

  def helpfulness(prompts, completions):  # judged on the summary only, as in the paper
    return scorer.score(prompts, [tinyworld_r1.summary_of(c) for c in completions])

  params = _grpo(ctx, out_dir, init, ac, _rule_rewards(ctx.config),
                 model_rewards={"helpfulness": (helpfulness, ac.helpfulness_weight)})
  return (*params, {"reward_model": {"heldout_pair_accuracy": rm_accuracy,
                                     "heldout_pairs": len(held)}})


# ---------------------------------------------------------------------------
# Pipeline.
# ---------------------------------------------------------------------------

def _r1_zero(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The R1-Zero run's directory, running it first when needed."""
  zdir = config.r1_zero_workdir or os.path.join(workdir, "r1_zero")
  if not os.path.exists(os.path.join(zdir, "results.json")):
    if config.r1_zero_workdir:
      raise ConfigError(f"r1_zero_workdir {zdir} has no results.json (run configs/r1_zero.py first)")
    os.makedirs(zdir, exist_ok=True)
    zc = _sub(config)
    for key in ("stages", "cold_start", "reasoning_rl", "rejection", "all_scenario",
                "r1_zero_workdir"):
      del zc[key]
    zc.stage = "r1_zero"
    with open(os.path.join(zdir, "config.json"), "w") as f:
      f.write(zc.to_json_best_effort(indent=2))
    r1_zero.run(zc, zdir)
  return zdir


def _read_results(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "results.json")) as f:
    return json.load(f)


def _row(results: dict, k: int) -> dict:
  return {c.format(k=k): results.get(c.format(k=k)) for c in COLUMNS}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  t0 = time.perf_counter()
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or stages != [s for s in STAGES if s in stages]:
    raise ConfigError(f"stages={config.stages!r}: pick, in order, from {', '.join(STAGES)}")
  zdir = _r1_zero(config, workdir)
  base_dir = config.base_workdir or os.path.join(zdir, "base")
  tok = load_tokenizer(os.path.join(base_dir, "tokenizer.model"))
  model = build_model(config.model)
  mesh = make_mesh(dict(config.mesh))
  base = r1_zero.base_params(config, base_dir, model, mesh)
  zero = load_params(zdir, *base)
  ec = config.eval
  ctx = Context(config, workdir, model, mesh, tok, base, zero,
                tinyworld.generate_problems("heldout", ec.num_problems, ec.seed, tuple(ec.levels)))

  zres = _read_results(zdir)
  k = ec.num_samples
  table = {"base": _row(zres["before"], k), "r1_zero": _row(zres["after"], k)}
  out = {"stage": "r1", "r1_zero_workdir": zdir, "stages": {}}
  current = zero
  for name in STAGES:
    sdir = os.path.join(workdir, name)
    done = os.path.exists(os.path.join(sdir, "results.json"))
    if name not in stages and not done:
      continue
    os.makedirs(sdir, exist_ok=True)
    if done:
      current = load_params(sdir, *base)
      res = _read_results(sdir)
    else:
      t1 = time.perf_counter()
      fn = {"cold_start": lambda: cold_start(ctx, sdir),
            "reasoning_rl": lambda: reasoning_rl(ctx, sdir, current),
            "rejection_sft": lambda: rejection_sft(ctx, sdir, current),
            "all_scenario_rl": lambda: all_scenario_rl(ctx, sdir, current)}[name]
      params, model_state, extra = fn()
      current = (params, model_state)
      res = dict(stage=name, **extra, eval=evaluate_stage(ctx, name, params, model_state, sdir),
                 seconds=round(time.perf_counter() - t1, 1))
      write_results(sdir, res)
    out["stages"][name] = res
    table[name] = _row(res["eval"], k)
  out["table"] = table
  out["seconds"] = round(time.perf_counter() - t0, 1)
  write_results(workdir, out)
  return out

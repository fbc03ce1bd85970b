"""Evaluate a checkpoint on held-out problems (the stages' evaluation; the
evaluation CLI, r1jax/evaluate.py, is built from the same pieces).

Figures (design.md §1): pass@1 averaged over k samples (temperature 0.6,
top-p 0.95 by default), cons@k (majority vote over the k answers), greedy
accuracy, format rate and mean completion length, overall and per level.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from r1jax.data.tokenizer import Tokenizer
from r1jax.eval.metrics import majority_vote, pass_at_k
from r1jax.parallel import distributed
from r1jax.rewards.accuracy import extract_answer, is_equivalent, normalize
from r1jax.data import tinyworld
from r1jax.rewards.format import format_reward
from r1jax.rewards.language import language_consistency_reward
from r1jax.sampling.sampler import SamplingConfig, sample


def _generate(model, params, tokenizer: Tokenizer, prompts: list[list[int]], rng,
              sc: SamplingConfig, batch_size: int, model_state=None) -> list[tuple[str, int]]:
  """(completion text, generated length) per row, prompt-major, in batches."""
  out = []
  batch_size = min(batch_size, len(prompts))
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[start:start + batch_size]
    real = len(chunk) * sc.num_samples
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # same shape: no recompile
    # fetch: on several hosts the output rows live on all of them (a collective:
    # every host evaluates the same prompts in the same order).
    res = distributed.fetch(sample(model, params, chunk, jax.random.fold_in(rng, b), sc,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                   model_state=model_state))
    tokens, lengths = res.tokens[:real], res.lengths[:real]
    out += [(tokenizer.decode(t[:n].tolist()), int(n)) for t, n in zip(tokens, lengths)]
  return out


def generate(model, params, tokenizer: Tokenizer, prompts: list[list[int]],
             ec: ml_collections.ConfigDict, rng, *, sampled: bool = True, greedy: bool = True,
             model_state=None):
  """(k sampled completions per prompt, one greedy completion per prompt), each a
  prompt-major list of (text, length), or None when not asked for.

  Sampling uses fold_in(rng, 0) and batches of `ec.batch_size` prompts; greedy
  fold_in(rng, 1) and batches of batch_size * k: the same key and batch make the
  same completions, so `evaluate` and the evaluation CLI agree sample by sample.
  `model_state`: the model's non-param collections (MoE router biases), if any.
  """
  stop_ids = tuple(tokenizer.piece_to_id(s) for s in ec.stop_pieces)
  k = ec.num_samples
  segments = ec.get("decode_segments", SamplingConfig.decode_segments)
  out_sampled = out_greedy = None
  if sampled:
    out_sampled = _generate(
        model, params, tokenizer, prompts, jax.random.fold_in(rng, 0),
        SamplingConfig(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature,
                       top_p=ec.top_p, num_samples=k, stop_token_ids=stop_ids,
                       decode_segments=segments), ec.batch_size,
        model_state)
  if greedy:
    out_greedy = _generate(
        model, params, tokenizer, prompts, jax.random.fold_in(rng, 1),
        SamplingConfig(max_new_tokens=ec.max_new_tokens, temperature=0.0,
                       stop_token_ids=stop_ids, decode_segments=segments),
        ec.batch_size * k, model_state)
  return out_sampled, out_greedy


def score_problem(gold: str, samples: Sequence[tuple[str, int]] | None,
                  greedy: tuple[str, int] | None, *, check_format: bool = True
                  ) -> tuple[dict[str, float], dict[str, Any]]:
  """Per-problem figures and what they came from: (metrics, details).

  metrics: pass1 (mean over the k samples), pass_k, cons (majority vote of the
  normalised answers), format (the R1-Zero tag format; only if `check_format`),
  length (mean tokens); greedy, greedy_format.
  details: the extracted answers, their correctness, the voted answer, the greedy answer.
  """
  metrics, details = {}, {}
  if samples is not None:
    k = len(samples)
    texts = [t for t, _ in samples]
    answers = [extract_answer(t) for t in texts]
    correct = [a is not None and is_equivalent(a, gold) for a in answers]
    voted = majority_vote([normalize(a) if a is not None else None for a in answers])
    metrics.update(
        pass1=float(np.mean(correct)), pass_k=pass_at_k(k, sum(correct), k),
        cons=float(voted is not None and is_equivalent(voted, gold)),
        length=float(np.mean([n for _, n in samples])))
    if check_format:
      metrics["format"] = float(np.mean([format_reward(t) for t in texts]))
    details.update(answers=answers, correct=correct, voted_answer=voted)
  if greedy is not None:
    g_text, g_length = greedy
    g_answer = extract_answer(g_text)
    metrics["greedy"] = float(g_answer is not None and is_equivalent(g_answer, gold))
    if check_format:
      metrics["greedy_format"] = format_reward(g_text)
    details.update(greedy_answer=g_answer, greedy_length=g_length)
  return metrics, details


def summarise(rows: Sequence[dict[str, float]], k: int) -> dict[str, float]:
  """Means of the per-problem metrics under their reported names (those present)."""
  names = {"pass1": "pass@1", "pass_k": f"pass@{k}", "cons": f"cons@{k}",
           "greedy": "greedy_accuracy", "format": "format_rate",
           "greedy_format": "greedy_format_rate", "length": "mean_completion_length",
           "language": "language_consistency", "summary_format": "summary_format_rate"}
  out = {name: float(np.mean([r[key] for r in rows])) for key, name in names.items()
         if rows and key in rows[0]}
  out["num_problems"] = len(rows)
  return out


def _r1_figures(lang: str, samples: Sequence[str]) -> dict[str, float]:
  """language: mean share of chain-of-thought words in the question's language (0
  for a chain of thought without language words, as the reward scores it);
  summary_format: R1's readable format (think, summary, answer)."""
  return {"language": float(np.mean([language_consistency_reward("", s, "", target_lang=lang)
                                     for s in samples])),
          "summary_format": float(np.mean([format_reward(s, summary=True) for s in samples]))}


def evaluate(model, params, tokenizer: Tokenizer, problems: Sequence[Any],
             make_prompt: Callable[[str], str], ec: ml_collections.ConfigDict, rng,
             samples_path: str | None = None, model_state=None) -> dict[str, float]:
  """Scores `problems` (objects with .question, .answer and optionally .level);
  `model_state` as in `generate`."""
  prompts = [tokenizer.encode(make_prompt(p.question)) for p in problems]
  k = ec.num_samples
  sampled, greedy = generate(model, params, tokenizer, prompts, ec, rng, model_state=model_state)

  rows, per_level = [], {}
  for i, p in enumerate(problems):
    samples = sampled[i * k:(i + 1) * k]
    row, _ = score_problem(p.answer, samples, greedy[i])
    if getattr(p, "lang", None) in tinyworld.LANGS:  # tiny world: the R1 figures too
      row.update(_r1_figures(p.lang, [t for t, _ in samples]))
    rows.append(row)
    per_level.setdefault(getattr(p, "level", 0), []).append(row)
    if samples_path and i < ec.num_samples_logged:
      with open(samples_path, "a") as f:
        f.write(json.dumps(dict(question=p.question, gold=p.answer, greedy_completion=greedy[i][0],
                                samples=[t for t, _ in samples], **row)) + "\n")

  results = summarise(rows, k)
  results.update(num_samples=k, temperature=ec.temperature, top_p=ec.top_p)
  results["per_level"] = {str(lv): summarise(rs, k) for lv, rs in sorted(per_level.items())}
  return results


def write_results(workdir: str, results: dict):
  """WORKDIR/results.json, replaced atomically (a kill never leaves half a file)."""
  path = os.path.join(workdir, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)

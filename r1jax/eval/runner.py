"""Evaluate a checkpoint on held-out problems with the R1-Zero template.

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
from r1jax.rewards.accuracy import extract_answer, is_equivalent, normalize
from r1jax.rewards.format import format_reward
from r1jax.sampling.sampler import SamplingConfig, sample


def _generate(model, params, tokenizer: Tokenizer, prompts: list[list[int]], rng,
              sc: SamplingConfig, batch_size: int) -> list[tuple[str, int]]:
  """(completion text, generated length) per row, prompt-major, in batches."""
  out = []
  batch_size = min(batch_size, len(prompts))
  for b, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = prompts[start:start + batch_size]
    real = len(chunk) * sc.num_samples
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # same shape: no recompile
    res = sample(model, params, chunk, jax.random.fold_in(rng, b),
                 sc, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tokens, lengths = np.asarray(res.tokens)[:real], np.asarray(res.lengths)[:real]
    out += [(tokenizer.decode(t[:n].tolist()), int(n)) for t, n in zip(tokens, lengths)]
  return out


def evaluate(model, params, tokenizer: Tokenizer, problems: Sequence[Any],
             make_prompt: Callable[[str], str], ec: ml_collections.ConfigDict, rng,
             samples_path: str | None = None) -> dict[str, float]:
  """Scores `problems` (objects with .question, .answer and optionally .level)."""
  prompts = [tokenizer.encode(make_prompt(p.question)) for p in problems]
  stop_ids = tuple(tokenizer.piece_to_id(s) for s in ec.stop_pieces)
  k = ec.num_samples
  sampled = _generate(model, params, tokenizer, prompts, jax.random.fold_in(rng, 0),
                      SamplingConfig(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature,
                                     top_p=ec.top_p, num_samples=k, stop_token_ids=stop_ids),
                      ec.batch_size)
  greedy = _generate(model, params, tokenizer, prompts, jax.random.fold_in(rng, 1),
                     SamplingConfig(max_new_tokens=ec.max_new_tokens, temperature=0.0,
                                    stop_token_ids=stop_ids), ec.batch_size * k)

  rows, per_level = [], {}
  for i, p in enumerate(problems):
    texts = [t for t, _ in sampled[i * k:(i + 1) * k]]
    answers = [extract_answer(t) for t in texts]
    correct = [a is not None and is_equivalent(a, p.answer) for a in answers]
    voted = majority_vote([normalize(a) if a is not None else None for a in answers])
    g_text, _ = greedy[i]
    g_answer = extract_answer(g_text)
    row = dict(
        pass1=float(np.mean(correct)), pass_k=pass_at_k(k, sum(correct), k),
        cons=float(voted is not None and is_equivalent(voted, p.answer)),
        greedy=float(g_answer is not None and is_equivalent(g_answer, p.answer)),
        format=float(np.mean([format_reward(t) for t in texts])),
        greedy_format=format_reward(g_text),
        length=float(np.mean([n for _, n in sampled[i * k:(i + 1) * k]])))
    rows.append(row)
    per_level.setdefault(getattr(p, "level", 0), []).append(row)
    if samples_path and i < ec.num_samples_logged:
      with open(samples_path, "a") as f:
        f.write(json.dumps(dict(question=p.question, gold=p.answer, greedy_completion=g_text,
                                samples=texts, **row)) + "\n")

  def summarise(rs):
    mean = lambda key: float(np.mean([r[key] for r in rs]))
    return {"pass@1": mean("pass1"), f"pass@{k}": mean("pass_k"), f"cons@{k}": mean("cons"),
            "greedy_accuracy": mean("greedy"), "format_rate": mean("format"),
            "greedy_format_rate": mean("greedy_format"),
            "mean_completion_length": mean("length"), "num_problems": len(rs)}

  results = summarise(rows)
  results.update(num_samples=k, temperature=ec.temperature, top_p=ec.top_p)
  results["per_level"] = {str(lv): summarise(rs) for lv, rs in sorted(per_level.items())}
  return results


def write_results(workdir: str, results: dict):
  """WORKDIR/results.json, replaced atomically (a kill never leaves half a file)."""
  path = os.path.join(workdir, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)

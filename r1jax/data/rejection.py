"""Rejection sampling (R1 stage 3): keep the correct, readable completions of a
checkpoint and write them as an SFT dataset with its statistics.

  kept, stats = select(candidates, FilterConfig())
  write_dataset("WORKDIR/rs_data", kept, stats)

The paper's filters, in the order they are applied (the first that fails
names the reason a completion is dropped):
  incorrect        the rule reward says the answer is wrong
  mixed_language   chain-of-thought words below `min_language_consistency` in the
                   prompt's language (completions without language words pass)
  long_paragraph   a paragraph (blank-line separated) over `max_paragraph_words`
  code_block       a ``` fence in the completion
  duplicate        the same completion (whitespace-normalised) for the same prompt
  over_cap         more than `max_per_prompt` kept for the prompt already

Dataset format (`write_dataset`): `data.jsonl`, one JSON object per example
{"id", "prompt", "completion", "kind" ("reasoning" | "non_reasoning"),
"source"}; `stats.json` {"candidates", "kept", "dropped": {reason: n},
"prompts", "prompts_kept"} plus whatever the caller adds (e.g. the mix).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterable, Optional, Sequence

from r1jax.data import jsonl, tinyworld
from r1jax.rewards.language import chain_of_thought, infer_language

REASONS = ("incorrect", "mixed_language", "long_paragraph", "code_block", "duplicate", "over_cap")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Which completions survive rejection sampling."""

  require_correct: bool = True
  min_language_consistency: float = 0.95  # share of CoT words in the prompt's language
  max_paragraph_words: int = 200  # longest paragraph allowed (words)
  drop_code_blocks: bool = True
  dedupe: bool = True
  max_per_prompt: int = 4  # kept completions per prompt; 0 = no cap


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One sampled completion and what the rule rewards said of it."""

  prompt_id: str
  prompt: str  # the question as the student will see it (template applied by the caller)
  completion: str
  correct: bool
  target_lang: Optional[str] = None  # None: the majority language of `prompt`
  source: str = ""


def language_consistency(completion: str, target_lang: Optional[str],
                         prompt: str = "") -> Optional[float]:
  """Share of the chain of thought's language words in the target language; None when
  the chain of thought has no language words (or no target can be inferred)."""
  lang = target_lang or infer_language(prompt)
  cot = chain_of_thought(completion)
  if lang is None or not any(tinyworld.word_language(w) for w in cot.split()):
    return None
  return tinyworld.language_fraction(cot, lang)


def longest_paragraph_words(completion: str) -> int:
  """Words in the longest blank-line-separated paragraph."""
  paragraphs = [p for p in completion.replace("\r\n", "\n").split("\n\n") if p.strip()]
  return max((len(p.split()) for p in paragraphs), default=0)


def reject_reason(c: Candidate, cfg: FilterConfig) -> Optional[str]:
  """The first content filter `c` fails, or None (duplicates and caps are `select`'s)."""
  if cfg.require_correct and not c.correct:
    return "incorrect"
  consistency = language_consistency(c.completion, c.target_lang, c.prompt)
  if consistency is not None and consistency < cfg.min_language_consistency:
    return "mixed_language"
  if longest_paragraph_words(c.completion) > cfg.max_paragraph_words:
    return "long_paragraph"
  if cfg.drop_code_blocks and "```" in c.completion:
    return "code_block"
  return None


def _normalise(text: str) -> str:
  return " ".join(text.split())


def select(candidates: Iterable[Candidate], cfg: FilterConfig = FilterConfig()
           ) -> tuple[list[Candidate], dict]:
  """The candidates that pass every filter, in input order, and the statistics."""
  kept: list[Candidate] = []
  dropped = collections.Counter({r: 0 for r in REASONS})
  seen: dict[str, set] = collections.defaultdict(set)
  per_prompt = collections.Counter()
  prompts = set()
  total = 0
  for c in candidates:
    total += 1
    prompts.add(c.prompt_id)
    reason = reject_reason(c, cfg)
    key = _normalise(c.completion)
    if reason is None and cfg.dedupe and key in seen[c.prompt_id]:
      reason = "duplicate"
    if reason is None and cfg.max_per_prompt and per_prompt[c.prompt_id] >= cfg.max_per_prompt:
      reason = "over_cap"
    if reason is not None:
      dropped[reason] += 1
      continue
    seen[c.prompt_id].add(key)
    per_prompt[c.prompt_id] += 1
    kept.append(c)
  stats = {"candidates": total, "kept": len(kept), "dropped": dict(dropped),
           "prompts": len(prompts), "prompts_kept": len(per_prompt)}
  return kept, stats


def write_dataset(directory: str, examples: Sequence[Candidate], stats: dict, *,
                  non_reasoning: Sequence[tuple[str, str]] = ()) -> str:
  """Writes `data.jsonl` (the kept reasoning examples, then the (prompt, answer)
  non-reasoning ones) and `stats.json` into `directory`, atomically; returns the jsonl path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "data.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i, c in enumerate(examples):
      f.write(json.dumps({"id": f"r{i}", "prompt": c.prompt, "completion": c.completion,
                          "kind": "reasoning", "source": c.source or c.prompt_id}) + "\n")
    for i, (prompt, answer) in enumerate(non_reasoning):
      f.write(json.dumps({"id": f"n{i}", "prompt": prompt, "completion": answer,
                          "kind": "non_reasoning", "source": "non_reasoning"}) + "\n")
  stats = dict(stats, reasoning=len(examples), non_reasoning=len(non_reasoning))
  with open(os.path.join(directory, "stats.json.tmp"), "w") as f:
    json.dump(stats, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  os.replace(os.path.join(directory, "stats.json.tmp"), os.path.join(directory, "stats.json"))
  return path


def read_dataset(path: str) -> list[dict]:
  """The rows of a `write_dataset` jsonl; ValueError naming file:line and field."""
  return jsonl.read_string_rows(path, ("prompt", "completion"))

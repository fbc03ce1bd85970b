"""Language-consistency reward (R1 stage 2): share of chain-of-thought words in the target language."""

from __future__ import annotations

import collections
import re
from typing import Optional

from r1jax.data import tinyworld

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def chain_of_thought(completion: str) -> str:
  """Text inside the `<think>…</think>` blocks, or the whole completion if there are none."""
  blocks = _THINK_RE.findall(completion)
  return " ".join(blocks) if blocks else completion


def infer_language(prompt: str) -> Optional[str]:
  """Majority language of the prompt's words (ties go to the first of `tinyworld.LANGS`), or None."""
  counts = collections.Counter(tinyworld.word_language(w) for w in prompt.split())
  counts.pop(None, None)
  if not counts:
    return None
  return max(tinyworld.LANGS, key=lambda lang: counts[lang])


def language_consistency_reward(prompt: str, completion: str, reference: str, *,
                                target_lang: Optional[str]) -> float:
  """Fraction of the chain-of-thought's language words that are in `target_lang`.

  Args:
    prompt: the prompt; its majority language is the target when `target_lang` is None.
    completion: the sampled completion.
    reference: unused (the reward needs no gold answer).
    target_lang: one of `tinyworld.LANGS`, or None to infer it from the prompt.

  Returns:
    A value in [0, 1]; 0.0 when the chain of thought has no language words or
    the target cannot be inferred.
  """
  del reference
  if target_lang is None:
    target_lang = infer_language(prompt)
    if target_lang is None:
      return 0.0
  return tinyworld.language_fraction(chain_of_thought(completion), target_lang)


def _question_of(prompt: str) -> str:
  """The user's question inside an R1-Zero templated prompt (the template's own
  English words must not decide the target language), else the prompt itself."""
  if "User: " in prompt and prompt.rstrip().endswith("Assistant:"):
    return prompt.rsplit("User: ", 1)[1].rsplit("Assistant:", 1)[0]
  return prompt


def language_consistency_reward_fn(prompt: str, completion: str, reference: str) -> float:
  """R1 stage 2's language reward in the reward signature: the share of the chain
  of thought in the question's language (inferred from the question, not the template)."""
  return language_consistency_reward(_question_of(prompt), completion, reference, target_lang=None)

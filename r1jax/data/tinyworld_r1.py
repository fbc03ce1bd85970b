"""The tiny world's data for the R1 stages (design.md §1, §3).

- Cold start (stage 1): `readable` rewrites a correct R1-Zero completion into
  R1's readable output format: every reasoning step in the prompt's language
  (the "human post-processing" of the paper, done by parsing the model's own
  steps and re-rendering them), then a one-sentence summary, then the answer:
  " <think> {steps} {conclusion} </think> {summary} <answer> N </answer>".
- Rejection sampling (stage 3): `translation_examples`, the non-reasoning SFT
  data: translate one solving sentence between the two languages, answered
  without a chain of thought.
- All-scenario RL (stage 4): `helpfulness_pairs`, preferences the reward
  model learns from the summary alone: a summary that states the answer is
  preferred to one that does not.
"""

from __future__ import annotations

import random
import re
from typing import Optional, Sequence

from r1jax.data import tinyworld
from r1jax.data.templates import r1_zero_prompt
from r1jax.data.tinyworld import LANGS, Problem, Step

_NUM = r"(?P<{}>\d+)"
_SUMMARIES = {"en": "in short , the answer is {r} .", "la": "breviter , responsum est {r} ."}
_UNHELPFUL = {"en": "that is all .", "la": "hoc est totum ."}
_TRANSLATE = {"en": "translate into english : {s}", "la": "translate into latin : {s}"}


def _phrase_regex(template: str) -> re.Pattern:
  body = re.escape(template)
  for name in "abr":
    body = body.replace(re.escape("{" + name + "}"), _NUM.format(name))
  return re.compile(r"^" + body.replace(r"\ ", r"\s+") + r"$")


# (lang, op, regex) for every step phrase; the connectives are stripped first.
_STEP_RES = [(lang, op, _phrase_regex(t)) for lang, phrases in tinyworld._STEP_PHRASES.items()  # pylint: disable=protected-access
             for op, t in phrases.items()]
_CONNECTIVE_WORDS = {w for c in tinyworld._CONNECTIVES.values()  # pylint: disable=protected-access
                     for w in (c["first"], c["last"], *c["middle"])}
_CONCLUSION_RES = [_phrase_regex(t) for t in tinyworld._CONCLUSIONS.values()]  # pylint: disable=protected-access


def _sentences(text: str) -> list[str]:
  return [s.strip() + " ." for s in text.split(" .") if s.strip()]


def parse_reasoning(cot: str) -> Optional[tuple[list[Step], int]]:
  """(steps, concluded answer) of a tiny-world chain of thought in any mix of the two
  languages, or None if any sentence is not a solving step or the final conclusion."""
  steps: list[Step] = []
  sentences = _sentences(cot)
  if not sentences:
    return None
  *body, last = sentences
  for sentence in body:
    words = sentence.split()
    if words and words[0] in _CONNECTIVE_WORDS:
      words = words[1:]
    text = " ".join(words)
    for _, op, regex in _STEP_RES:
      m = regex.match(text)
      if m:
        steps.append((op, int(m["a"]), int(m["b"]), int(m["r"])))
        break
    else:
      return None
  for regex in _CONCLUSION_RES:
    m = regex.match(last)
    if m:
      return steps, int(m["r"])
  return None


def summary_sentence(answer, lang: str) -> str:
  return _SUMMARIES[lang].format(r=answer)


def render_readable(steps: Sequence[Step], answer, lang: str) -> str:
  """The readable R1 completion of `steps` in `lang`."""
  n = len(steps)
  body = [tinyworld._step_sentence(s, i, n, lang) for i, s in enumerate(steps)]  # pylint: disable=protected-access
  body.append(tinyworld._CONCLUSIONS[lang].format(r=answer))  # pylint: disable=protected-access
  return f" <think> {' '.join(body)} </think> {summary_sentence(answer, lang)} <answer> {answer} </answer>"


def readable(completion: str, lang: str, *, min_steps: int = 1) -> Optional[str]:
  """`completion` (an R1-Zero output) rewritten in R1's readable format in `lang`, or
  None when its reasoning cannot be parsed, has fewer than `min_steps` steps (an
  answer without reasoning is no long-CoT example) or does not compute (a step
  whose result is wrong, a conclusion that is not the last result)."""
  m = re.search(r"<think>(.*?)</think>\s*<answer>\s*(-?\d+)\s*</answer>", completion, re.DOTALL)
  if m is None:
    return None
  parsed = parse_reasoning(m.group(1))
  if parsed is None:
    return None
  steps, concluded = parsed
  if len(steps) < min_steps:
    return None
  ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
  if any(ops[op](a, b) != r for op, a, b, r in steps):
    return None
  answer = int(m.group(2))
  if concluded != answer or (steps and steps[-1][3] != answer):
    return None
  return render_readable(steps, answer, lang)


def question_language(question: str) -> str:
  """The tiny-world language a question is written in."""
  from r1jax.rewards.language import infer_language  # deferred: avoids an import cycle
  return infer_language(question) or LANGS[0]


def translation_examples(num: int, seed: int) -> list[tuple[str, str]]:
  """(prompt, completion) pairs: translate one solving sentence, no chain of thought."""
  rng = random.Random(f"tinyworld_r1/translate/{seed}")
  out = []
  for p in tinyworld.generate_problems("train", num, seed, tinyworld.LEVELS):
    op, a, b, r = rng.choice(p.steps)
    src, dst = rng.sample(LANGS, 2)
    sentence = tinyworld._STEP_PHRASES[src][op].format(a=a, b=b, r=r)  # pylint: disable=protected-access
    target = tinyworld._STEP_PHRASES[dst][op].format(a=a, b=b, r=r)  # pylint: disable=protected-access
    # The template puts its own period after the question.
    out.append((r1_zero_prompt(_TRANSLATE[dst].format(s=sentence[:-2])), f" {target}"))
  return out


def helpfulness_pairs(problems: Sequence[Problem], seed: int) -> list[dict]:
  """{"prompt", "chosen", "rejected"} rows judged on the summary alone (as R1 judges
  helpfulness): the chosen summary states the answer, the rejected one does not."""
  rng = random.Random(f"tinyworld_r1/helpful/{seed}")
  rows = []
  for p in problems:
    lang = question_language(p.question)
    if rng.random() < 0.5:  # some pairs in the other language: the preference is not about it
      lang = LANGS[1 - LANGS.index(lang)]
    rows.append({"prompt": r1_zero_prompt(p.question),
                 "chosen": f" {summary_sentence(p.answer, lang)}",
                 "rejected": f" {_UNHELPFUL[lang]}"})
  return rows


def summary_of(completion: str) -> str:
  """The text between </think> and <answer> (what the helpfulness reward model judges)."""
  m = re.search(r"</think>(.*?)<answer>", completion, re.DOTALL)
  return f" {m.group(1).strip()}" if m else ""

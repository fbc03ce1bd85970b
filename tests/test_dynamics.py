"""Self-evolution metrics on hand-made completions in both tiny-world
languages: reflections counted once each, answer changes detected, length and
per-level statistics; the self-correcting corpus documents they are meant for."""

import random

import numpy as np
import pytest

from r1jax.data import tinyworld
from r1jax.eval import dynamics

EN_FIX = (" <think> first we add 3 and 4 to get 8 . wait , let me check . we add 3 and 4 to get "
          "7 . finally we multiply 7 by 2 to get 14 . so the answer is 14 . </think> "
          "<answer> 14 </answer>")
LA_FIX = (" <think> primo addimus 3 et 4 et fit 8 . exspecta , recognoscamus . addimus 3 et 4 et "
          "fit 7 . postremo multiplicamus 7 per 2 et fit 14 . ergo responsum est 14 . </think> "
          "<answer> 14 </answer>")
LA_SAME = LA_FIX.replace("et fit 8", "et fit 7")  # reflects, keeps its (right) result
PLAIN = " <think> we add 3 and 4 to get 7 . so the answer is 7 . </think> <answer> 7 </answer>"


def test_reflections_are_counted_once_each_in_both_languages():
  assert len(dynamics.reflections(EN_FIX)) == 1  # "wait" + "let me check": one reflection
  assert len(dynamics.reflections(LA_FIX)) == 1
  assert dynamics.reflections(PLAIN) == []
  two = EN_FIX.replace("finally", "wait . finally")
  assert len(dynamics.reflections(two)) == 2
  # Whole words only, any case: "awaited" is no reflection, "Aha" is.
  assert dynamics.reflections("we awaited the answer .") == []
  assert len(dynamics.reflections("Aha , that is it .")) == 1


def test_reflection_followed_by_a_changed_answer():
  assert dynamics.reflection_changes(EN_FIX) == [True]
  assert dynamics.reflection_changes(LA_FIX) == [True]
  assert dynamics.reflection_changes(LA_SAME) == [False]
  assert dynamics.reflection_changes("wait .") == [False]  # nothing before or after


def test_step_dynamics_overall_and_per_level():
  completions = [EN_FIX, LA_FIX, LA_SAME, PLAIN]
  lengths = [40, 30, 20, 10]
  m = dynamics.step_dynamics(completions, lengths, levels=[2, 2, 1, 1], correct=[1, 0, 1, 1])
  assert m["reflection/rate"] == 0.75 and m["reflection/per_completion"] == 0.75
  assert m["reflection/changed_answer_rate"] == pytest.approx(2 / 3)
  assert m["completions/length/mean"] == 25 and m["completions/length/p50"] == 25
  assert m["completions/length/p90"] == pytest.approx(np.percentile(lengths, 90))
  assert m["completions/length/level_2/mean"] == 35 and m["completions/length/level_1/mean"] == 15
  assert m["accuracy/level_2"] == 0.5 and m["accuracy/level_1"] == 1.0
  assert m["reflection/rate/level_1"] == 0.5
  only_en = dynamics.step_dynamics([LA_FIX], [30], markers={"en": ("wait",)})
  assert only_en["reflection/rate"] == 0.0  # the marker list is the config's


def test_self_correcting_corpus_documents():
  rng = random.Random(0)
  for p in tinyworld.generate_problems("train", 30, 0, (1, 2, 3, 4)):
    for mode in ("en", "la", "mixed"):
      text = tinyworld.self_correcting_solution(p, mode, rng)
      assert len(dynamics.reflections(text)) == 1 and dynamics.reflection_changes(text) == [True]
      assert text.endswith(tinyworld._CONCLUSIONS["en"].format(r=p.answer)) or text.endswith(  # pylint: disable=protected-access
          tinyworld._CONCLUSIONS["la"].format(r=p.answer))  # pylint: disable=protected-access
  kw = dict(drill_fraction=0.3, direct_fraction=0.85, malformed_fraction=0.3, plain_fraction=0.7)
  base = tinyworld.pretraining_corpus(2000, 0, **kw)
  assert tinyworld.pretraining_corpus(2000, 0, self_correct_fraction=0.0, **kw) == base
  seeded = tinyworld.pretraining_corpus(2000, 0, self_correct_fraction=0.5, **kw)
  share = np.mean([bool(dynamics.reflections(d)) for d in seeded])
  assert 0.1 < share < 0.5, share  # half of the plain and reasoning template documents
  assert not any(dynamics.reflections(d) for d in base)

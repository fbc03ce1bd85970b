"""Library pieces of the R1 pipeline against references: the Bradley–Terry and
token-level KD losses against float64 NumPy (values and gradients), and the
rejection-sampling filters on hand-made completions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.data import rejection
from r1jax.losses.distill import TokenKDLoss
from r1jax.losses.reward_model import BradleyTerryLoss


# ---------------------------------------------------------------------------
# Bradley–Terry.
# ---------------------------------------------------------------------------

def _bt_numpy(c, r, w, margin, center):
  c, r, w = (np.asarray(x, np.float64) for x in (c, r, w))
  n = max(w.sum(), 1.0)
  d = c - r - margin
  loss = np.sum(np.log1p(np.exp(-d)) * w) / n + center * np.sum((c + r) ** 2 * w) / n
  sig = 1 / (1 + np.exp(-d))
  grad_c = (-(1 - sig) * w + 2 * center * (c + r) * w) / n
  grad_r = ((1 - sig) * w + 2 * center * (c + r) * w) / n
  return loss, grad_c, grad_r


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.01)])
def test_bradley_terry_matches_float64(margin, center):
  rng = np.random.default_rng(0)
  c, r = rng.normal(size=9).astype(np.float32) * 3, rng.normal(size=9).astype(np.float32) * 3
  c[0], r[0] = 40.0, -40.0  # far in the tail: softplus must not overflow
  w = (rng.random(9) > 0.2).astype(np.float32)
  loss = BradleyTerryLoss(margin=margin, center_weight=center)
  f = lambda c, r: loss.apply({}, c, r, w)[0]
  got = f(c, r)
  gc, gr = jax.grad(f, argnums=(0, 1))(c, r)
  want, wc, wr = _bt_numpy(c, r, w, margin, center)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(gc, wc, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gr, wr, rtol=1e-5, atol=1e-7)
  _, m = loss.apply({}, c, r, w)
  np.testing.assert_allclose(m["accuracy"], np.sum((c > r) * w) / w.sum(), rtol=1e-6)


# ---------------------------------------------------------------------------
# Token-level KD.
# ---------------------------------------------------------------------------

def _kd_numpy(s, t, w, tau, direction):
  s, t, w = (np.asarray(x, np.float64) for x in (s, t, w))
  lsm = lambda x: x - x.max(-1, keepdims=True) - np.log(
      np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  ls, lt = lsm(s / tau), lsm(t / tau)
  p, q = (lt, ls) if direction == "forward" else (ls, lt)
  kl = np.sum(np.exp(p) * (p - q), -1)
  return tau ** 2 * np.sum(kl * w) / max(w.sum(), 1.0)


@pytest.mark.parametrize("tau,direction", [(1.0, "forward"), (2.0, "forward"), (0.7, "reverse")])
def test_token_kd_matches_float64(tau, direction):
  rng = np.random.default_rng(1)
  B, T, V = 2, 5, 11
  s = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  t = rng.normal(size=(B, T, V)).astype(np.float32) * 2
  w = (rng.random((B, T)) > 0.3).astype(np.float32)
  loss = TokenKDLoss(temperature=tau, direction=direction)
  f = lambda s: loss.apply({}, s, jnp.asarray(t), w)[0]
  np.testing.assert_allclose(f(s), _kd_numpy(s, t, w, tau, direction), rtol=1e-5)
  # Gradient against central differences of the float64 reference.
  g = np.asarray(jax.grad(f)(s), np.float64)
  eps = 1e-4
  for idx in [(0, 0, 3), (1, 4, 10), (0, 2, 0)]:
    d = np.zeros_like(s, np.float64)
    d[idx] = eps
    fd = (_kd_numpy(s + d, t, w, tau, direction) - _kd_numpy(s - d, t, w, tau, direction)) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-3, atol=1e-6)
  # The teacher gets no gradient; identical distributions give 0.
  assert not np.any(jax.grad(lambda t: loss.apply({}, s, t, w)[0])(t))
  np.testing.assert_allclose(loss.apply({}, t, t, w)[0], 0.0, atol=1e-6)
  if direction == "forward":  # forward KD gradient: τ (softmax(s/τ) - softmax(t/τ)) w / Σw
    sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
        x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    want = tau * (sm(s / tau) - sm(t / tau)) * w[..., None] / w.sum()
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_token_kd_rejects_mismatched_vocab():
  with pytest.raises(ValueError, match="same tokenizer"):
    TokenKDLoss().apply({}, jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 6)), jnp.ones((1, 2)))


# ---------------------------------------------------------------------------
# Rejection-sampling filters.
# ---------------------------------------------------------------------------

EN = " <think> first we add 6 and 6 to get 12 . finally we add 12 and 8 to get 20 . so the answer is 20 . </think> <answer> 20 </answer>"
LA = " <think> primo addimus 6 et 6 et fit 12 . postremo addimus 12 et 8 et fit 20 . ergo responsum est 20 . </think> <answer> 20 </answer>"
MIXED = " <think> primo addimus 6 et 6 et fit 12 . postremo addimus 12 et 8 et fit 20 . so the answer is 20 . </think> <answer> 20 </answer>"
Q_EN = "compute 6 + 6 + 8"
Q_LA = "calcula 6 + 6 + 8"


def _c(pid, prompt, completion, correct=True, lang=None):
  return rejection.Candidate(pid, prompt, completion, correct, lang)


def test_each_filter_on_hand_made_completions():
  cfg = rejection.FilterConfig(max_paragraph_words=40, max_per_prompt=2)
  long_para = " ".join(["first we add 1 and 1 to get 2 ."] * 5)  # 50 words, one paragraph
  split_paras = "\n\n".join(["first we add 1 and 1 to get 2 ."] * 5)  # 10 words each
  cases = [
      (_c("a", Q_EN, EN), None),
      (_c("a", Q_EN, EN, correct=False), "incorrect"),
      (_c("a", Q_EN, MIXED), "mixed_language"),  # 10 of 14 words Latin in an English prompt
      (_c("a", Q_LA, LA), None),  # the prompt's language decides the target
      (_c("a", Q_LA, EN), "mixed_language"),
      (_c("a", Q_EN, LA, lang="la"), None),  # an explicit target wins over the prompt
      (_c("a", Q_EN, " <think> 6 + 6 = 12 </think> <answer> 12 </answer>"), None),  # no words: passes
      (_c("a", Q_EN, long_para), "long_paragraph"),
      (_c("a", Q_EN, split_paras), None),
      (_c("a", Q_EN, EN + "\n```python\nprint(20)\n```"), "code_block"),
  ]
  for cand, want in cases:
    assert rejection.reject_reason(cand, cfg) == want, (cand.completion, want)
  # "so the answer is" (4 English words) against 10 Latin ones.
  assert rejection.language_consistency(MIXED, "en") == pytest.approx(4 / 14)
  assert rejection.longest_paragraph_words(split_paras) == 10


def test_select_dedupes_caps_and_counts(tmp_path):
  cfg = rejection.FilterConfig(max_per_prompt=2)
  cands = [_c("p1", Q_EN, EN), _c("p1", Q_EN, EN.replace(" . ", "  .  ")),  # same, spaced
           _c("p1", Q_EN, EN, correct=False), _c("p1", Q_EN, EN + " "),
           _c("p1", Q_EN, EN.replace("first", "first ,")), _c("p1", Q_EN, EN.replace("12 .", "12 ;")),
           _c("p2", Q_LA, LA), _c("p2", Q_LA, MIXED), _c("p3", Q_EN, MIXED, correct=False)]
  kept, stats = rejection.select(cands, cfg)
  assert [c.prompt_id for c in kept] == ["p1", "p1", "p2"]
  assert stats["dropped"] == {"incorrect": 2, "mixed_language": 1, "long_paragraph": 0,
                              "code_block": 0, "duplicate": 2, "over_cap": 1}
  assert stats["candidates"] == 9 and stats["kept"] == 3
  assert stats["prompts"] == 3 and stats["prompts_kept"] == 2
  assert stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"]
  path = rejection.write_dataset(str(tmp_path / "rs"), kept, stats,
                                 non_reasoning=[("repeat 7 7", "7 7")])
  rows = rejection.read_dataset(path)
  assert [r["kind"] for r in rows] == ["reasoning"] * 3 + ["non_reasoning"]
  assert rows[0]["completion"] == EN and rows[-1]["prompt"] == "repeat 7 7"
  written = json.load(open(tmp_path / "rs" / "stats.json"))
  assert written["reasoning"] == 3 and written["non_reasoning"] == 1
  (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'completion'"):
    rejection.read_dataset(str(tmp_path / "bad.jsonl"))


# ---------------------------------------------------------------------------
# Tiny-world R1 data: readable rewrites, translation task, helpfulness pairs.
# ---------------------------------------------------------------------------

def test_readable_rewrite_of_r1_zero_outputs():
  import random
  from r1jax.data import tinyworld, tinyworld_r1
  from r1jax.rewards.format import format_reward
  rng = random.Random(0)
  for p in tinyworld.generate_problems("train", 60, 0, (1, 2, 3, 4)):
    for mode in ("en", "la", "mixed"):
      out = tinyworld_r1.readable(tinyworld.r1_zero_completion(p, mode, rng), "la")
      # One language, the same steps, a summary: R1's readable format.
      assert out == tinyworld_r1.render_readable(p.steps, p.answer, "la"), (mode, out)
      assert rejection.language_consistency(out, "la") == 1.0
      assert format_reward(out, summary=True) == 1.0 and format_reward(out) == 0.0
  assert tinyworld_r1.readable(MIXED, "en") == (
      " <think> first we add 6 and 6 to get 12 . finally we add 12 and 8 to get 20 . so the "
      "answer is 20 . </think> in short , the answer is 20 . <answer> 20 </answer>")
  # Not rewritable: a wrong step, a conclusion that is not the last result, no reasoning,
  # a sentence that is not a step, no answer block.
  for bad in (EN.replace("to get 12", "to get 13"), EN.replace("answer is 20", "answer is 19"),
              " <think> so the answer is 20 . </think> <answer> 20 </answer>",
              EN.replace("first we add", "first we ponder"), EN.split("<answer>")[0]):
    assert tinyworld_r1.readable(bad, "en") is None, bad
  assert tinyworld_r1.summary_of(tinyworld_r1.readable(EN, "en")) == " in short , the answer is 20 ."


def test_translation_task_and_helpfulness_pairs():
  from r1jax.data import tinyworld, tinyworld_r1
  for prompt, completion in tinyworld_r1.translation_examples(20, 0):
    src = prompt.split(" : ")[1].split(". Assistant:")[0]
    lang = "la" if "into latin" in prompt else "en"
    other = "en" if lang == "la" else "la"
    assert rejection.language_consistency(completion, lang) == 1.0
    assert rejection.language_consistency(src, other) == 1.0
    assert "<think>" not in completion  # non-reasoning: no chain of thought
  problems = tinyworld.generate_problems("train", 20, 0, (1, 2))
  rows = tinyworld_r1.helpfulness_pairs(problems, 0)
  for p, row in zip(problems, rows):
    assert str(p.answer) in row["chosen"].split() and str(p.answer) not in row["rejected"]
  assert {rejection.language_consistency(r["chosen"], "la") for r in rows} == {0.0, 1.0}


def test_language_reward_reads_the_question_not_the_template():
  from r1jax.data.templates import r1_zero_prompt
  from r1jax.rewards import language_consistency_reward_fn
  # The R1-Zero template is English; a Latin question still asks for Latin reasoning.
  assert language_consistency_reward_fn(r1_zero_prompt(Q_LA), LA, "") == 1.0
  assert language_consistency_reward_fn(r1_zero_prompt(Q_LA), EN, "") == 0.0
  assert language_consistency_reward_fn(r1_zero_prompt(Q_EN), MIXED, "") == pytest.approx(4 / 14)
  assert language_consistency_reward_fn(Q_EN, EN, "") == 1.0  # an untemplated prompt

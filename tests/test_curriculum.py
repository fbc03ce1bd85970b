"""Prompt curricula and DAPO dynamic sampling (r1jax.data.curriculum)."""

import collections
import hashlib
import json

import ml_collections
import numpy as np
import pytest

from r1jax.data import curriculum, datasets, jsonl, tinyworld
from r1jax.errors import ConfigError

LEVELS = (1, 2, 3, 4)
P = 8  # prompts per step
G = 4  # completions per prompt


def _cc(mode="uniform", **kw):
  cc = curriculum.default_config()
  cc.mode = mode
  if mode == "fixed":
    cc.stage_levels, cc.stage_steps = ((1,), (1, 2), (1, 2, 3), LEVELS), (3, 6, 8)
  cc.update(kw)
  return cc


def _task(levels=LEVELS, per_level=10):
  problems = [jsonl.TaskProblem(f"t{lv}-{i}", f"q{lv}-{i}", str(i), f"f:{i}", "math", lv)
              for lv in levels for i in range(per_level)]
  return [(p, [k]) for k, p in enumerate(problems)]


def _problem(x):
  return x[0] if isinstance(x, tuple) else x


def _correct_BG(drawn, step):
  """Fake 0/1 accuracy, a pure function of (uid, sample, step), rising with the step."""
  p = min(1.0, 0.2 + 0.1 * step)
  return np.array([[int(hashlib.sha256(f"{_problem(x).uid}/{g}".encode()).hexdigest(), 16) % 100
                    < 100 * p for g in range(G)] for x in drawn], np.float32)


def _step_problems(gc, seed, step, task=None):
  """The GRPO trainer's draw before curricula (grpo.step_problems), kept verbatim."""
  if task is None:
    return tinyworld.generate_problems("train", gc.prompts_per_step, seed * 1_000_003 + step,
                                       tuple(gc.levels))
  return datasets.StepBatches(task, gc.prompts_per_step, seed).batch(step)


@pytest.mark.parametrize("levels", [LEVELS, (2, 1, 3)])
def test_uniform_round0_is_the_trainers_draw_before_curricula(levels):
  gc = ml_collections.ConfigDict(dict(prompts_per_step=P, levels=levels))
  task = _task()
  tiny = curriculum.Curriculum(_cc(), levels=levels, prompts_per_step=P, seed=3)
  on_task = curriculum.Curriculum(_cc(), levels=levels, prompts_per_step=P, seed=3, task=task)
  for step in range(12):  # 96 draws: over two epochs of the 40-problem task
    assert tiny.draw(step) == _step_problems(gc, 3, step)
    assert on_task.draw(step) == _step_problems(gc, 3, step, task)


def test_extra_rounds_continue_the_task_order_and_reseed_the_tiny_world():
  task = _task()
  plain = curriculum.Curriculum(_cc(), levels=LEVELS, prompts_per_step=P, seed=0, task=task)
  stream = [x for s in range(4) for x in plain.draw(s)]
  cur = curriculum.Curriculum(_cc(), levels=LEVELS, prompts_per_step=P, seed=0, task=task)
  got = cur.draw(0) + cur.draw(0, 1, n=3) + cur.draw(0, 2, n=2) + cur.draw(1)
  assert got == stream[:P + 3 + 2 + P]  # step 1 starts where step 0's last round stopped
  assert cur.state_dict()["extra"] == 5

  tiny = curriculum.Curriculum(_cc(), levels=LEVELS, prompts_per_step=P, seed=0)
  round0 = {p.uid for s in range(20) for p in tiny.draw(s)}
  extra = [p.uid for p in tiny.draw(5, 1)]
  assert extra == [p.uid for p in tiny.draw(5, 1)]  # a function of (seed, step, round)
  assert extra != [p.uid for p in tiny.draw(5, 2)] and extra != [p.uid for p in tiny.draw(6, 1)]
  assert len(set(extra) & round0) < P // 2  # fresh problems, not another step's round 0


def test_fixed_stages_switch_at_stage_steps():
  cc = _cc("fixed", stage_levels=((1,), (1, 2), (1, 2, 3), LEVELS), stage_steps=(10, 20, 30))
  cur = curriculum.Curriculum(cc, levels=LEVELS, prompts_per_step=P, seed=0)
  assert [cur.levels_at(s) for s in (0, 9, 10, 19, 20, 29, 30, 1000)] == \
      [(1,), (1,), (1, 2), (1, 2), (1, 2, 3), (1, 2, 3), LEVELS, LEVELS]
  assert {p.level for p in cur.draw(0)} == {1}
  assert {p.level for p in cur.draw(15)} == {1, 2}
  cur.observe(15, [p.level for p in cur.draw(15)], np.ones((P, G)))
  assert cur.metrics()["curriculum/max_level"] == 2.0


def test_adaptive_moves_up_after_min_steps_and_threshold_only():
  cur = curriculum.Curriculum(_cc("adaptive", threshold=0.5, min_steps_per_level=3),
                              levels=LEVELS, prompts_per_step=P, seed=0)
  def observe(step, acc_top, acc_rest=1.0):
    top = max(cur.levels_at(step))
    levels = [1, 2, 3, 4] * 2
    cur.observe(step, levels, np.array([[acc_top if lv == top else acc_rest] * G
                                        for lv in levels]))
    return cur.levels_at(step + 1)
  assert cur.levels_at(0) == (1,)
  assert observe(0, 1.0) == (1,) and observe(1, 1.0) == (1,)  # too few steps at level 1
  assert observe(2, 0.25, acc_rest=0.0) == (1,)  # enough steps, below the threshold
  assert observe(3, 0.5) == (1, 2)  # >= threshold: level 2 added
  assert cur.metrics()["curriculum/top_level_accuracy"] == 0.5
  assert observe(4, 1.0) == (1, 2)  # the step count restarts at the new level
  assert observe(5, 0.0, acc_rest=1.0) == (1, 2)  # only the hardest level's accuracy counts
  assert observe(6, 1.0) == (1, 2, 3)
  for step in range(7, 20):
    observe(step, 1.0)
  assert cur.levels_at(20) == LEVELS  # never beyond the top level
  assert {p.level for p in cur.draw(20)} == set(LEVELS)
  cur.observe(21, [1] * P, np.ones((P, G)))  # no group at the top level: no accuracy
  assert "curriculum/top_level_accuracy" not in cur.metrics()
  with pytest.raises(ValueError, match=r"\[groups, G\] with 3 groups"):
    cur.observe(22, [1, 2, 3], np.ones((2, G)))


def test_informative_groups():
  mask, right, wrong = curriculum.informative_groups(
      np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]]))
  assert mask.tolist() == [False, False, True] and (right, wrong) == (1, 1)
  mask, right, wrong = curriculum.informative_groups(
      np.array([[0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]]))
  assert mask.tolist() == [True, False, False, False] and (right, wrong) == (2, 0)


@pytest.mark.parametrize("fields, match", [
    (dict(mode="curriculum"), r"grpo.curriculum.mode must be one of"),
    (dict(mode="fixed"), r"grpo.curriculum.stage_levels is empty"),
    (dict(mode="fixed", stage_levels=((1,), (1, 5))),
     r"grpo.curriculum.stage_levels\[1\]=\(1, 5\)"),
    (dict(mode="fixed", stage_levels=((1,), ())), r"grpo.curriculum.stage_levels\[1\]"),
    (dict(mode="fixed", stage_levels=((1,), (1, 2)), stage_steps=(3, 6)),
     r"grpo.curriculum.stage_steps has 2 entries; 2 stages need 1"),
    (dict(mode="fixed", stage_levels=((1,), (2,), (3,)), stage_steps=(5, 5)),
     r"grpo.curriculum.stage_steps=\(5, 5\) must be positive and strictly increasing"),
    (dict(mode="fixed", stage_levels=((1,), (2,)), stage_steps=(0,)),
     r"grpo.curriculum.stage_steps=\(0,\)"),
    (dict(mode="adaptive", threshold=0.0), r"grpo.curriculum.threshold must be in \(0, 1\]"),
    (dict(threshold=1.5), r"grpo.curriculum.threshold"),
    (dict(min_steps_per_level=0), r"grpo.curriculum.min_steps_per_level"),
    (dict(max_rounds=0), r"grpo.curriculum.max_rounds must be >= 1, got 0"),
])
def test_validate_names_the_field(fields, match):
  cc = curriculum.default_config()
  cc.update(fields)
  with pytest.raises(ConfigError, match=match):
    curriculum.validate(cc, LEVELS)
  with pytest.raises(ConfigError, match=match):
    curriculum.Curriculum(cc, levels=LEVELS, prompts_per_step=P, seed=0)


def test_validate_accepts_the_defaults_and_a_fixed_schedule():
  curriculum.validate(curriculum.default_config(), LEVELS)
  curriculum.validate(_cc("fixed"), LEVELS)
  curriculum.validate(_cc("adaptive", threshold=1.0), LEVELS)


def test_task_curriculum_draws_allowed_levels_in_equal_shares():
  cur = curriculum.Curriculum(_cc("fixed"), levels=LEVELS, prompts_per_step=P, seed=0,
                              task=_task())
  seen = []
  for step, want in ((0, {1: 8}), (3, {1: 4, 2: 4}), (6, {1: 3, 2: 3, 3: 2}),
                     (8, {1: 2, 2: 2, 3: 2, 4: 2})):
    drawn = cur.draw(step)
    assert all(isinstance(ids, list) for _, ids in drawn)
    assert {lv: sum(p.level == lv for p, _ in drawn) for lv in want} == want
    assert sum(want.values()) == len(drawn)
    seen += [p.uid for p, _ in drawn if p.level == 1]
  drawn = cur.draw(8, 1, n=5)  # 5 over 4 levels: the extra one to level 1
  assert sorted(p.level for p, _ in drawn) == [1, 1, 2, 3, 4]
  seen += [p.uid for p, _ in drawn if p.level == 1]
  # 19 level-1 draws: one epoch of its 10 problems and 9 of the next.
  assert sorted(collections.Counter(seen).values()) == [1] + [2] * 9
  assert set(seen) == {f"t1-{i}" for i in range(10)}
  assert cur.state_dict()["cursors"] == {"1": 19, "2": 10, "3": 5, "4": 3}


def test_task_curriculum_needs_levels():
  for mode in ("adaptive", "fixed"):
    with pytest.raises(ConfigError, match=rf"mode='{mode}' needs problem levels"):
      curriculum.Curriculum(_cc(mode), levels=LEVELS, prompts_per_step=P, seed=0,
                            task=_task(levels=(0,)))
  with pytest.raises(ConfigError, match=r"no problems of level\(s\) \[4\]"):
    curriculum.Curriculum(_cc("adaptive"), levels=LEVELS, prompts_per_step=P, seed=0,
                          task=_task(levels=(1, 2, 3)))
  # Uniform mode does not look at levels.
  curriculum.Curriculum(_cc(), levels=LEVELS, prompts_per_step=P, seed=0, task=_task(levels=(0,)))


def _run(cur, steps, log):
  for step in steps:
    drawn = []
    for r in range(1 + (step % 3 == 1) + (step % 4 == 2)):  # extra rounds on some steps
      drawn += cur.draw(step, r, n=None if r == 0 else 3)
    log.append((cur.levels_at(step), [_problem(x).uid for x in drawn]))
    cur.observe(step, [_problem(x).level for x in drawn], _correct_BG(drawn, step))


@pytest.mark.parametrize("on_task", [False, True], ids=["tinyworld", "task"])
@pytest.mark.parametrize("mode", ["uniform", "fixed", "adaptive"])
def test_resume_draws_what_the_uninterrupted_run_draws(mode, on_task):
  def make():
    return curriculum.Curriculum(_cc(mode, threshold=0.5), levels=LEVELS, prompts_per_step=P,
                                 seed=1, task=_task() if on_task else None)
  full, log = make(), []
  _run(full, range(10), log)
  first, head = make(), []
  _run(first, range(5), head)
  resumed, tail = make(), []
  resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
  _run(resumed, range(5, 10), tail)
  assert head + tail == log
  assert resumed.state_dict() == full.state_dict()
  assert resumed.metrics() == full.metrics()
  if mode != "uniform":  # the curriculum did move, so the state mattered
    assert log[0][0] == (1,) and log[9][0] == LEVELS
  # A fresh curriculum (no state) at step 5 draws differently where state matters.
  fresh, other = make(), []
  _run(fresh, range(5, 10), other)
  assert (other != tail) == (on_task or mode == "adaptive")


def test_resume_rejects_another_mode():
  state = curriculum.Curriculum(_cc("adaptive"), levels=LEVELS, prompts_per_step=P,
                                seed=0).state_dict()
  cur = curriculum.Curriculum(_cc(), levels=LEVELS, prompts_per_step=P, seed=0)
  with pytest.raises(ConfigError, match=r"grpo.curriculum.mode='uniform', but .* 'adaptive'"):
    cur.load_state_dict(state)


def test_jsonl_reads_levels(tmp_path):
  path = tmp_path / "t.jsonl"
  rows = [dict(question="1 + 1", answer="2", level=3), dict(problem="2 + 2", answer="4"),
          dict(question="3 + 3", answer="6", difficulty=2), dict(question="x", answer="1",
                                                                 level="Level 5")]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  problems, _ = jsonl.load_problems(str(path))
  assert [p.level for p in problems] == [3, 0, 2, 5]
  for bad in (0, -1, 2.5, "hard", True, None):
    path.write_text(json.dumps(dict(question="q", answer="1")) + "\n"
                    + json.dumps(dict(question="q", answer="1", difficulty=bad)) + "\n")
    with pytest.raises(jsonl.JsonlError, match=r"t.jsonl:2: field 'difficulty' must be an "
                                               r"integer level >= 1"):
      jsonl.load_problems(str(path))
    problems, counts = jsonl.load_problems(str(path), on_error="skip")
    assert len(problems) == 1 and counts["malformed"] == 1


# ---------------------------------------------------------------------------
# In the GRPO trainer (micro model; a fake accuracy reward gives mixed groups).
# ---------------------------------------------------------------------------

def _parity(prompt, completion, reference):
  return float(len(completion) % 2)


def test_trainer_dynamic_sampling_and_adaptive_curriculum_resume_exactly(tmp_path):
  from tests.test_grpo_trainer import _micro_train
  from r1jax.data.tokenizer import load_tokenizer, train_sentencepiece
  tok = load_tokenizer(train_sentencepiece(tinyworld.pretraining_corpus(2000, seed=0),
                                           tmp_path / "tw", vocab_size=640))
  cc = _cc("adaptive", threshold=0.3, min_steps_per_level=1, dynamic_sampling=True,
           max_rounds=3)
  kw = dict(rewards={"accuracy": (_parity, 1.0)}, curriculum=cc, prompts_per_step=4)
  _, rows = _micro_train(tmp_path / "straight", tok, num_steps=4, **kw)
  _micro_train(tmp_path / "resumed", tok, num_steps=2, **kw)
  _, resumed = _micro_train(tmp_path / "resumed", tok, num_steps=4, **kw)
  assert [r["step"] for r in rows] == [r["step"] for r in resumed] == [1, 2, 3, 4]
  keys = [k for k in rows[0] if k.startswith(("curriculum/", "reward", "loss", "accuracy/"))]
  for want, got in zip(rows, resumed):  # the resumed run drew and trained on the same groups
    for k in keys:
      np.testing.assert_allclose(got.get(k), want.get(k), rtol=1e-5, err_msg=k)
  assert rows[-1]["curriculum/max_level"] > 1  # the level rose during the run
  assert max(r["curriculum/rounds"] for r in rows) > 1  # extra rounds were drawn
  assert all(1 <= r["curriculum/rounds"] <= 3 for r in rows)
  for r in rows:  # every group kept is informative unless the rounds ran out
    assert r["curriculum/informative_groups"] == 1.0 or r["curriculum/rounds"] == 3
    assert r["frac_reward_zero_std"] <= 1 - r["curriculum/informative_groups"] + 1e-6

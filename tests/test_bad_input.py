"""Bad input never crashes a run obscurely nor loses work: task-file lines with
file:line and field in the error (or skipped and counted), over-long prompts
truncated or skipped (counted), empty and non-UTF-8 completions, gold answers
that cannot be verified (skipped, never rewarded), unknown config keys (close
matches listed)."""

import json
import os

import numpy as np
import pytest

from r1jax.data import jsonl
from tests.conftest import SHARED_DATA

GOOD = [{"question": "compute 1 + 2", "answer": "3"},
        {"problem": "compute 2 * 3", "answer": 6},
        {"prompt": "sum of a and b", "tests": {"tests": [{"input": "1 2", "output": "3"}]}},
        {"question": "half of one", "answer": "\\frac{1}{2}", "id": "half"}]


def _write(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
  return str(path)


BAD_LINES = [  # (line, words the error must contain)
    (b'{"question": "compute 1 +\n', "invalid JSON"),
    (b'["question", "answer"]\n', "expected a JSON object"),
    ({"answer": "3"}, "field 'question' missing"),
    ({"question": 7, "answer": "3"}, "field 'question' must be a non-empty string"),
    ({"question": "   ", "answer": "3"}, "field 'question' must be a non-empty string"),
    ({"question": "compute 1 + 2"}, "field 'answer' missing"),
    (b'{"question": "caf\xe9 bill", "answer": "3"}\n', "not valid UTF-8 (byte 0xe9 at column"),
]


@pytest.mark.parametrize("bad,needle", BAD_LINES, ids=[n.split(" (")[0] for _, n in BAD_LINES])
def test_malformed_line_names_file_line_and_field(tmp_path, bad, needle):
  path = _write(tmp_path / "task.jsonl", [GOOD[0], GOOD[1], bad, GOOD[3]])
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.load_problems(path)
  assert str(e.value).startswith(f"{path}:3: ") and needle in str(e.value), str(e.value)
  # skip: counted, and every good line is still there, in order.
  problems, counts = jsonl.load_problems(path, on_error="skip")
  assert [p.question for p in problems] == ["compute 1 + 2", "compute 2 * 3", "half of one"]
  assert counts["malformed"] == 1 and counts["kept"] == 3 and counts["lines"] == 4


def test_all_bad_lines_skipped_and_counted(tmp_path, caplog):
  path = _write(tmp_path / "task.jsonl",
                [GOOD[0]] + [b for b, _ in BAD_LINES] + [b"\n", GOOD[2], GOOD[3]])
  problems, counts = jsonl.load_problems(path, on_error="skip")
  assert counts == {"lines": 11, "blank": 1, "kept": 3, "malformed": 7, "bad_gold": 0}
  assert [p.kind for p in problems] == ["math", "code", "math"]
  assert problems[2].uid == "half" and problems[0].source == f"{path}:1"
  assert "kept 3 problems, skipped 7 malformed lines" in caplog.text
  with pytest.raises(ValueError, match="on_error"):
    jsonl.load_problems(path, on_error="ignore")


def test_missing_file_is_a_user_error(tmp_path):
  with pytest.raises(jsonl.JsonlError, match="nope.jsonl: cannot read task file"):
    jsonl.load_problems(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("answer", ["None", "see the solution", "N/A", "", None, True, "??",
                                    float("nan"), "Janet sells eggs.\n#### ", [1, 2]])
def test_unverifiable_gold_answer_is_skipped_and_never_rewarded(tmp_path, answer):
  from r1jax.rewards import accuracy_reward_fn
  row = {"question": "what is it", "answer": answer}
  path = _write(tmp_path / "t.jsonl", [GOOD[0], json.dumps(row, allow_nan=True).encode() + b"\n"])
  problems, counts = jsonl.load_problems(path)  # never an error: the file is fine
  assert counts["bad_gold"] == 1 and [p.answer for p in problems] == ["3"]
  # It is not in the task, so no completion can be rewarded against it; what
  # is in the task is verified as numbers/math.
  assert accuracy_reward_fn("", "<answer>3.0</answer>", problems[0].answer) == 1.0


def test_gold_answer_forms():
  assert jsonl.gold_answer("Janet sells 9.\n#### 1,080") == "1,080"
  assert jsonl.gold_answer(27.0) == "27" and jsonl.gold_answer(2.5) == "2.5"
  assert jsonl.gold_answer("so \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
  assert jsonl.gold_answer("025") == "025" and jsonl.gold_answer("\\sqrt{2}") == "\\sqrt{2}"
  assert jsonl.gold_answer("A") == "A"  # multiple choice letters stay verifiable


def test_bad_code_tests_are_skipped_and_counted(tmp_path):
  path = _write(tmp_path / "t.jsonl", [GOOD[2], {"prompt": "f", "tests": {"inputs": ["1"]}},
                                       {"prompt": "g", "tests": "not json"}])
  problems, counts = jsonl.load_problems(path)
  assert counts["bad_gold"] == 2 and len(problems) == 1


def test_real_eval_sets_load_without_loss():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data is not here")
  for name, n in (("gsm8k/test.jsonl", 1319), ("aime24/test.jsonl", 30), ("amc23/test.jsonl", 40)):
    problems, counts = jsonl.load_problems(os.path.join(SHARED_DATA, name))
    assert counts["kept"] == n and counts["malformed"] == counts["bad_gold"] == 0, (name, counts)
  assert problems[0].answer == "27"  # amc23 stores floats


def test_overlong_prompts_truncated_from_the_left_or_skipped():
  from collections import Counter
  prompts = [list(range(5)), list(range(12)), list(range(8))]
  counts = Counter()
  assert jsonl.fit_prompts(prompts, 8, "truncate_left", counts) == [
      list(range(5)), list(range(4, 12)), list(range(8))]
  assert jsonl.fit_prompts(prompts, 8, "skip", counts) == [list(range(5)), None, list(range(8))]
  assert counts == {"prompts_truncated": 1, "prompts_skipped": 1}
  with pytest.raises(ValueError, match="truncate_left"):
    jsonl.fit_prompt([1], 4, "truncate_right")


def test_empty_and_non_utf8_completions_score_zero_without_errors():
  from r1jax.rewards import (RewardRunner, accuracy_reward_fn, format_reward_fn,
                             tag_count_reward_fn)
  from r1jax.rewards.code import code_reward_fn
  tests = json.dumps({"tests": [{"input": "", "output": "1"}]})
  runner = RewardRunner({"accuracy": (accuracy_reward_fn, 1.0), "format": (format_reward_fn, 1.0),
                         "tag_count": (tag_count_reward_fn, 1.0)}, workers=0)
  weird = ["", "\udcff\udcfe<answer>\ud800</answer>", b"\xff\xfe".decode("utf-8", "replace")]
  total, per_fn, stats = runner.score(["p"] * 3, weird, ["1"] * 3)
  assert total[0] == 0.0 and all(np.isfinite(total))
  assert all(stats[f"rewards/{n}/errors"] == 0 for n in ("accuracy", "format", "tag_count"))
  for completion in ("", "```python\nprint('\udcff')\n```"):
    assert code_reward_fn("p", completion, tests) == 0.0


def test_empty_completions_give_a_finite_grpo_loss():
  """A completion that is only the stop token (or nothing at all) is masked, not NaN."""
  import jax.numpy as jnp
  from r1jax.losses.grpo import GRPOLoss
  from r1jax.trainers import grpo
  G, N = 2, 4
  batch = grpo.build_batch([[5, 6, 7]], G, np.zeros((G, N), np.int32), np.zeros((G, N), np.float32),
                           np.array([0, 0]), np.array([True, True]), np.array([0.0, 0.0]), pad_id=0)
  assert batch["mask"].sum() == 0
  logp = jnp.zeros(batch["mask"].shape)
  for agg in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"):
    loss = GRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_aggregation=agg,
                    max_completion_length=N)
    value, _ = loss.apply(
        {}, logp, jnp.asarray(batch["old_logp"]), logp, jnp.asarray(batch["advantages"]),
        jnp.asarray(batch["mask"]), jnp.asarray(batch["truncated"]))
    assert np.isfinite(float(value)) and float(value) == 0.0, agg


# ---------------------------------------------------------------------------
# Through the CLI: one line, exit code 2, nothing already written lost.
# ---------------------------------------------------------------------------

def _snapshot(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file() and p.name != "config.json"}  # config.json: the command's own config


def test_unknown_config_key_lists_close_matches(tmp_path):
  from tests.test_cli import REPO, _assert_one_line_error, _cli
  smoke = f"--config={REPO}/configs/r1_zero.py:smoke"
  _assert_one_line_error(_cli(smoke, f"--workdir={tmp_path}", "--config.grpo.num_step=3"),
                         "--config.grpo.num_step=3", "did you mean grpo.num_steps?")
  _assert_one_line_error(_cli(smoke, f"--workdir={tmp_path}", "--config.trian.log_every=3"),
                         "no config field 'trian'", "did you mean train or pretrain?")
  # Nothing close: the fields of that level are listed.
  _assert_one_line_error(_cli(smoke, f"--workdir={tmp_path}", "--config.train.zzz=1"),
                         "config.train has checkpoint_every, keep_checkpoints, log_every")


def test_bad_task_file_fails_before_any_work_and_loses_nothing(tmp_path):
  from tests.test_cli import REPO, _assert_one_line_error, _cli
  workdir = tmp_path / "w"
  (workdir / "checkpoints" / "3").mkdir(parents=True)
  (workdir / "checkpoints" / "3" / "state").write_bytes(b"an earlier run's checkpoint")
  (workdir / "metrics.jsonl").write_text('{"step": 3, "loss": 0.5}\n')
  before = _snapshot(workdir)
  task = _write(tmp_path / "task.jsonl", [GOOD[0], {"answer": "3"}, GOOD[1]])
  flags = [f"--config={REPO}/configs/r1_zero.py:smoke", f"--workdir={workdir}",
           f"--config.grpo.train_file={task}"]
  _assert_one_line_error(_cli(*flags), f"{task}:2: field 'question' missing")
  assert _snapshot(workdir) == before
  bad_utf8 = _write(tmp_path / "latin1.jsonl", [b'{"question": "caf\xe9", "answer": "1"}\n'])
  _assert_one_line_error(_cli(*flags[:2], f"--config.grpo.train_file={bad_utf8}"),
                         f"{bad_utf8}:1: not valid UTF-8")
  assert _snapshot(workdir) == before

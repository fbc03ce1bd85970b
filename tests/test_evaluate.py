"""The evaluation CLI: oracle completions score 1.0 on the real benchmark files
and ~0 shuffled; on a tiny r1jax model it reproduces the pretraining stage's
own evaluation sample for sample; a Hugging Face checkpoint + tokenizer.json
runs through the R1 chat path; bad task files fail naming file:line/field."""

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from r1jax import evaluate
from r1jax.data import jsonl
from r1jax.main import load_config
from tests.conftest import SHARED_DATA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_CONFIG = os.path.join(REPO, "configs", "eval.py")
# benchmark -> (problems, raw question field, raw gold -> its number)
BENCHMARKS = {
    "gsm8k": (1319, "question", lambda a: Fraction(a.rsplit("####", 1)[1].strip().replace(",", ""))),
    "aime24": (30, "problem", Fraction),
    "amc23": (40, "question", lambda a: Fraction(a).limit_denominator(1000)),
}


def _config(arg: str, **overrides):
  c = load_config(f"{EVAL_CONFIG}:{arg}")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _rows(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def _needs(path):
  if not os.path.exists(path):
    pytest.skip("../shared/data is not beside the repo")
  return path


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "r1jax.evaluate", *args], capture_output=True,
                        text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_oracle_scores_gold_one_and_shuffled_near_zero(bench, tmp_path):
  num, question_field, value = BENCHMARKS[bench]
  c = _config(bench, **{"eval.mode": "oracle_gold"})
  raw = _rows(_needs(c.data.path))
  gold = evaluate.run(c, str(tmp_path))
  assert gold["pass@1"] == 1.0 and gold["cons@1"] == 1.0 and gold["num_problems"] == num
  rows = _rows(tmp_path / "eval" / f"{bench}-oracle_gold" / "predictions.jsonl")
  assert [r["question"] for r in rows] == [r[question_field].strip() for r in raw]
  assert all(r["correct"] == [True] for r in rows)

  c.eval.mode = "oracle_shuffled"
  shuffled = evaluate.run(c, str(tmp_path))
  rows = _rows(tmp_path / "eval" / f"{bench}-oracle_shuffled" / "predictions.jsonl")
  answers = [r["answers"][0] for r in rows]
  assert sorted(answers) == sorted(r["gold"] for r in rows)  # a permutation of the golds ...
  # ... scored right exactly where the shown answer equals the problem's own raw
  # gold as a number: problems that share an answer (amc23 has 7 four times).
  coincide = [Fraction(a.replace(",", "")) == value(r["answer"]) for a, r in zip(answers, raw)]
  assert [r["correct"][0] for r in rows] == coincide
  assert shuffled["pass@1"] == pytest.approx(sum(coincide) / num)
  assert shuffled["pass@1"] < 0.05, shuffled


def test_cli_writes_predictions_and_summary(tmp_path):
  _needs(os.path.join(SHARED_DATA, "amc23", "test.jsonl"))
  proc = _cli(f"--config={EVAL_CONFIG}:amc23", f"--workdir={tmp_path}",
              "--config.eval.mode=oracle_gold", "--config.name=amc")
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert printed["pass@1"] == 1.0 and printed["num_problems"] == 40
  summary = json.load(open(tmp_path / "eval" / "amc" / "summary.json"))
  assert summary["counts"]["kept"] == 40 and summary["mode"] == "oracle_gold"
  row = _rows(tmp_path / "eval" / "amc" / "predictions.jsonl")[0]
  assert {"id", "question", "gold", "completions", "answers", "correct"} <= set(row)
  assert row["gold"] == "27" and "\\boxed{27}" in row["completions"][0]  # amc23 stores 27.0


def _write(path, lines):
  with open(path, "wb") as f:
    f.writelines(l if isinstance(l, bytes) else (json.dumps(l) + "\n").encode() for l in lines)
  return str(path)


def test_bad_task_files_name_file_line_and_field(tmp_path):
  ok = {"problem": "1 + 1", "answer": "2"}
  cases = [
      (str(tmp_path / "nope.jsonl"), [f"{tmp_path}/nope.jsonl", "cannot read"]),
      (_write(tmp_path / "bad.jsonl", [ok, b'{"problem": "2 +\n']), ["bad.jsonl:2:", "invalid JSON"]),
      (_write(tmp_path / "field.jsonl", [ok, ok, {"question": "x", "answer": "1"}]),
       ["field.jsonl:3:", "field 'problem' missing"]),
      (_write(tmp_path / "gold.jsonl", [ok, {"problem": "x", "solution": "1"}]),
       ["gold.jsonl:2:", "field 'answer' missing"]),
  ]
  for path, needles in cases:
    c = _config("aime24", **{"eval.mode": "oracle_gold", "data.path": path})
    with pytest.raises(jsonl.JsonlError) as e:
      evaluate.run(c, str(tmp_path / "w"))
    assert all(n in str(e.value) for n in needles), str(e.value)
  # The CLI says it in one line, exit code 2.
  proc = _cli(f"--config={EVAL_CONFIG}:aime24", f"--workdir={tmp_path / 'w'}",
              "--config.eval.mode=oracle_gold", f"--config.data.path={tmp_path}/bad.jsonl")
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert errors[0].startswith(f"r1jax: error: {tmp_path}/bad.jsonl:2: invalid JSON"), errors


def test_config_errors():
  with pytest.raises(ValueError, match="<model>"):
    _config("gsm8k,aime24")
  c = _config("gsm8k", **{"eval.mode": "beam"})
  with pytest.raises(evaluate.ConfigError, match="eval.mode='beam'"):
    evaluate.run(c, "/nonexistent")
  c = _config("gsm8k")  # an hf model needs its path
  with pytest.raises(evaluate.ConfigError, match="model_path"):
    evaluate.run(c, "/nonexistent")


# ---------------------------------------------------------------------------
# With a model.
# ---------------------------------------------------------------------------

# Compiling dominates; 2 steps are as good a "trained" model for this as 30.
SMOKE = dict(train=dict(num_steps=2, checkpoint_every=2, progress_bar=False),
             data=dict(num_docs=1500), tokenizer=dict(num_docs=1500), eval=dict(num_problems=8))


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
  """A pretraining-stage workdir (configs/pretrain.py:smoke, shrunk), run in-process
  exactly as `python -m r1jax.main` runs it."""
  from r1jax.stages import pretrain  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("smoke")
  c = load_config(f"{REPO}/configs/pretrain.py:smoke")
  for section, values in SMOKE.items():
    c[section].update(values)
  (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
  pretrain.run(c, str(workdir))
  return workdir


def test_tiny_model_reproduces_the_stage_evaluation(smoke_workdir):
  """Also across decode segment counts: the stage sampled in 4, this in 3."""
  stage = json.load(open(smoke_workdir / "results.json"))
  c = _config("smoke", **{"data.num_problems": SMOKE["eval"]["num_problems"]})
  c.eval.decode_segments = 0  # reaches the sampler, which refuses it
  with pytest.raises(ValueError, match="decode_segments=0"):
    evaluate.run(c, str(smoke_workdir))
  c.eval.decode_segments = 3
  ours = evaluate.run(c, str(smoke_workdir))
  for key in ("pass@1", "pass@2", "cons@2", "greedy_accuracy", "format_rate",
              "greedy_format_rate", "mean_completion_length", "num_problems"):
    assert ours[key] == stage[key], key
  assert ours["model_step"] == stage["step"] == 2
  # Sample for sample: same problems, keys and batches give the same completions.
  logged = _rows(smoke_workdir / "eval_samples.jsonl")
  predicted = _rows(smoke_workdir / "eval" / "tinyworld-both" / "predictions.jsonl")
  assert len(logged) == len(predicted) == 8
  for log, pred in zip(logged, predicted):
    assert (pred["question"], pred["gold"]) == (log["question"], log["gold"])
    assert pred["completions"] == log["samples"]
    assert pred["greedy_completion"] == log["greedy_completion"]
  assert len({t for p in predicted for t in p["completions"]}) > 8  # really sampled, not empty


def test_hf_checkpoint_through_the_chat_path(tmp_path):
  """A random Qwen2-shaped r1jax model exported to safetensors + a tokenizer.json:
  the `hf` preset loads both and samples with the R1 chat format."""
  pytest.importorskip("tokenizers")
  pytest.importorskip("safetensors")
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  from r1jax.checkpoint import hf  # pylint: disable=import-outside-toplevel
  from r1jax.data.templates import R1_ASSISTANT, R1_BOS, R1_USER  # pylint: disable=import-outside-toplevel
  from r1jax.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from r1jax.models.transformer import Transformer  # pylint: disable=import-outside-toplevel

  c = _config("hf,gsm8k", **{"data.limit": 3, "eval.mode": "sampled", "eval.num_samples": 2,
                              "eval.max_new_tokens": 6, "dtype": "float32",
                              "model_path": str(tmp_path / "ckpt")})
  questions = [r["question"] for r in _rows(_needs(c.data.path))[:200]]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(questions, trainers.BpeTrainer(
      vocab_size=400, special_tokens=[R1_BOS, "<｜end▁of▁sentence｜>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_tokens([AddedToken(t, normalized=False) for t in (R1_USER, R1_ASSISTANT, "<think>")])
  os.makedirs(c.model_path)
  tok.save(os.path.join(c.model_path, "tokenizer.json"))
  json.dump(dict(bos_token=R1_BOS, eos_token="<｜end▁of▁sentence｜>"),
            open(os.path.join(c.model_path, "tokenizer_config.json"), "w"))

  config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       qkv_bias=True, tie_word_embeddings=True, initializer_range=0.5)
  shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)  # host-filled: an eager init would compile op by op
  params = jax.tree.map(lambda x: rng.normal(0.0, 0.5, x.shape).astype(np.float32), shapes)
  hf.save(c.model_path, params, config)

  summary = evaluate.run(c, str(tmp_path / "w"))
  assert summary["num_problems"] == 3 and summary["num_samples"] == 2
  assert "format_rate" not in summary  # the R1-Zero tag format is not the chat format's
  rows = _rows(tmp_path / "w" / "eval" / "gsm8k-sampled" / "predictions.jsonl")
  assert [r["question"] for r in rows] == questions[:3]
  for r in rows:
    assert len(r["completions"]) == 2 and all(1 <= n <= 6 for n in r["lengths"])
    assert r["correct"] == [False, False] and r["pass1"] == 0.0  # a random model
  assert len({t for r in rows for t in r["completions"]}) > 3  # sampled, and decoded

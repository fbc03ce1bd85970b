"""TFDS builders (array_record, no TensorFlow), task specs and the grain step order."""

import collections
import json
import os
import subprocess
import sys

import pytest

from r1jax.data import datasets, jsonl, tinyworld
from tests.test_grpo_trainer import micro_tokenizer  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _key(p):
  return (p.question, p.answer)


def test_tensorflow_is_not_needed():
  code = ("import sys; from r1jax.data import datasets; import tensorflow_datasets, grain; "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_tinyworld_builder_writes_the_generators_problems(data_dir):
  b = datasets.build_tinyworld(data_dir, num_train=120, num_test=16, seed=3)
  assert {s: v.num_examples for s, v in b.info.splits.items()} == {"train": 120, "test": 16}
  assert os.listdir(b.data_dir) and any(f.endswith("array_record-00000-of-00001")
                                        for f in os.listdir(b.data_dir))
  spec = f"tfds:{b.info.full_name.rsplit('/', 1)[0]}:test"
  got, counts = datasets.load_problems(spec, data_dir=data_dir)
  want = tinyworld.generate_problems("heldout", 16, 3)
  assert counts["kept"] == 16
  assert sorted((p.uid, p.question, p.answer, p.level, p.lang) for p in got) == \
      sorted((p.uid, p.question, p.answer, p.level, p.lang) for p in want)
  train, _ = datasets.load_problems(spec.replace(":test", ":train"), data_dir=data_dir)
  assert not {p.uid for p in train} & {p.uid for p in got}
  assert {p.uid for p in train} == {p.uid for p in tinyworld.generate_problems("train", 120, 3)}


def test_gsm8k_from_local_files_is_tfds_own_dataset(data_dir):
  b = datasets.build_gsm8k(data_dir, os.path.join(SHARED, "gsm8k"))
  assert b.info.full_name == "gsm8k/1.0.0"
  assert {s: v.num_examples for s, v in b.info.splits.items()} == {"train": 7473, "test": 1319}
  # TFDS's catalog builder (tfds.data_source("gsm8k")) reads what we wrote.
  import tensorflow_datasets as tfds
  src = tfds.data_source("gsm8k", split="test", data_dir=data_dir, download=False)
  assert set(src[0]) == {"question", "answer", "annotation", "short_answer"}
  got, counts = datasets.load_problems("tfds:gsm8k:test", data_dir=data_dir)
  want, _ = jsonl.load_problems(os.path.join(SHARED, "gsm8k", "test.jsonl"))
  assert counts["kept"] == 1319
  assert collections.Counter(map(_key, got)) == collections.Counter(map(_key, want))
  row = next(src[i] for i in range(len(src)) if src[i]["question"].decode() == want[0].question)
  assert row["short_answer"].decode() == want[0].answer == "18"


def test_gsm8k_builder_names_a_bad_line(tmp_path):
  local = tmp_path / "gsm"
  local.mkdir()
  (local / "test.jsonl").write_text('{"question": "q", "answer": "x #### 1"}\n'
                                    '{"question": "q2", "answer": "no marker"}\n')
  with pytest.raises(datasets.DatasetError, match=r"test.jsonl:2: field 'answer' has no '####"):
    datasets.build_gsm8k(str(tmp_path / "out"), str(local))
  with pytest.raises(datasets.DatasetError, match="no GSM8K files"):
    datasets.build_gsm8k(str(tmp_path / "out"), str(tmp_path))


def test_jsonl_builder_maps_fields_like_the_jsonl_reader(data_dir):
  path = os.path.join(SHARED, "amc23", "test.jsonl")
  b = datasets.build_jsonl(data_dir, "amc23", {"test": path})
  got, _ = datasets.load_problems("tfds:r1jax_jsonl/amc23:test", data_dir=data_dir)
  want, _ = jsonl.load_problems(path)
  assert len(got) == len(want) == b.info.splits["test"].num_examples
  assert sorted(map(_key, got)) == sorted(map(_key, want))
  assert "27" in {p.answer for p in got}  # 27.0 in the file, normalised
  aime = os.path.join(SHARED, "aime24", "test.jsonl")
  datasets.build_jsonl(data_dir, "aime24", {"test": aime}, question_field="problem")
  got, _ = datasets.load_problems("tfds:r1jax_jsonl/aime24:test", data_dir=data_dir)
  assert len(got) == 30 and "699" in {p.answer for p in got}


def test_jsonl_builder_errors_name_file_line_field(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "compute 1 + 1", "answer": 2}\n{"question": "x"}\n')
  with pytest.raises(jsonl.JsonlError, match=rf"{bad}:2: field 'answer' missing"):
    datasets.build_jsonl(str(tmp_path / "d"), "bad", {"train": str(bad)})
  b = datasets.build_jsonl(str(tmp_path / "d"), "skip", {"train": str(bad)}, on_bad_line="skip")
  assert b.info.splits["train"].num_examples == 1
  with pytest.raises(datasets.DatasetError, match=r"missing.jsonl: no such task file"):
    datasets.build_jsonl(str(tmp_path / "d"), "m", {"train": str(tmp_path / "missing.jsonl")})
  with pytest.raises(datasets.DatasetError, match=r"tfds:nope:train .*cannot open.*Build it"):
    datasets.load_problems("tfds:nope:train", data_dir=str(tmp_path / "d"))


def test_array_record_file_round_trip_and_errors(tmp_path):
  path = str(tmp_path / "task.array_record")
  rows = [dict(question=f"compute {i} + 1", answer=str(i + 1), level=1) for i in range(5)]
  datasets.write_array_record(path, rows)
  got, counts = datasets.load_problems(path)
  assert [(p.question, p.answer, p.level) for p in got] == \
      [(r["question"], r["answer"], 1) for r in rows]
  datasets.write_array_record(path, rows[:2] + [dict(question="x")] + [dict(q=1)])
  with pytest.raises(jsonl.JsonlError, match=r"task.array_record\[2\]: field 'answer' missing"):
    datasets.load_problems(path)
  got, counts = datasets.load_problems(path, on_error="skip")
  assert len(got) == 2 and counts["malformed"] == 2
  with pytest.raises(datasets.DatasetError, match="no such array_record file"):
    datasets.load_problems(str(tmp_path / "none.array_record"))


def test_step_batches_are_deterministic_epochs_and_split_over_hosts():
  items = list(range(10))
  order = datasets.StepBatches(items, 4, seed=0)
  first = [order.batch(s) for s in range(10)]  # 40 items = 4 epochs
  assert first == [datasets.StepBatches(items, 4, seed=0).batch(s) for s in range(10)]
  assert first != [datasets.StepBatches(items, 4, seed=1).batch(s) for s in range(10)]
  flat = [x for b in first for x in b]
  for e in range(4):  # each epoch is a permutation, reshuffled
    assert sorted(flat[10 * e:10 * (e + 1)]) == items
  assert flat[:10] != flat[10:20]
  # Resuming at step 6 (a fresh object, as after a restart) continues the same stream.
  it = datasets.StepBatches(items, 4, seed=0).iterator(6)
  assert [next(it) for _ in range(4)] == first[6:]
  # Each of n hosts reads its contiguous rows; together they are the global batch.
  for n in (1, 2, 4):
    assert [sum((order.rows_for(s, i, n) for i in range(n)), []) for s in range(10)] == first
  with pytest.raises(ValueError, match="does not split over 3"):
    order.rows_for(0, 0, 3)


def test_grpo_and_eval_read_a_tfds_task(data_dir, micro_tokenizer):
  import ml_collections
  from r1jax import evaluate
  from r1jax.trainers import grpo
  datasets.build_jsonl(data_dir, "amc23", {"test": os.path.join(SHARED, "amc23", "test.jsonl")})
  gc = ml_collections.ConfigDict(dict(
      train_file="tfds:r1jax_jsonl/amc23:test", data_dir=data_dir, on_bad_line="raise",
      max_prompt_tokens=0, overlong_prompts="truncate_left", max_new_tokens=8,
      prompts_per_step=8))
  task = grpo.load_task(gc, micro_tokenizer, 4096)
  assert len(task) == 40
  steps = [grpo.step_problems(gc, 0, s, task) for s in range(5)]  # one epoch
  assert sorted(p.uid for b in steps for p, _ in b) == sorted(p.uid for p, _ in task)
  from r1jax.main import load_config
  ec = load_config(os.path.join(REPO, "configs", "eval.py:amc23"))
  ec.data.path, ec.data.data_dir = "tfds:r1jax_jsonl/amc23:test", data_dir
  problems, counts = evaluate.load_problems(ec)
  assert len(problems) == 40 and evaluate._data_name(ec.data.path) == "r1jax_jsonl-amc23"


def test_cli_builds_and_reports(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "r1jax.data.datasets", "--dataset=tinyworld", "--num_train=30",
       "--num_test=8", f"--data_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["splits"] == {"train": 30, "test": 8}
  got, _ = datasets.load_problems(report["read_as"].replace("<split>", "test"),
                                  data_dir=str(tmp_path))
  assert len(got) == 8
  bad = subprocess.run(
      [sys.executable, "-m", "r1jax.data.datasets", "--dataset=jsonl", "--name=x",
       "--files=train", f"--data_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == \
      "error: --files: expected split=path[,split=path], got 'train'"

"""Problem sets on disk (TFDS, array_record) and the order the trainers read them in.

Three TFDS builders write array_record files, readable without TensorFlow
(`tfds.data_source`), each record one problem (`uid`, `question`, `answer`,
`kind`, `level`, `lang`, `source`):

  python -m r1jax.data.datasets --dataset=tinyworld --data_dir=~/tensorflow_datasets
  python -m r1jax.data.datasets --dataset=jsonl --name=mymath \\
      --files=train=/data/train.jsonl,test=/data/test.jsonl \\
      --question_field=problem --answer_field=solution
  python -m r1jax.data.datasets --dataset=gsm8k --local_dir=../shared/data/gsm8k

- `tinyworld`: the tiny world's train and held-out problems (r1jax.data.tinyworld).
- `r1jax_jsonl/<name>`: any task file(s), through the jsonl reader's field
  mapping, gold-answer normalisation and file:line:field errors.
- `gsm8k`: TFDS's own catalog builder (same name, version and features as
  `tfds.load("gsm8k")`), reading `train.jsonl` / `test.jsonl` from a local
  directory instead of downloading them.

Anything that takes a task (`grpo.train_file`, the evaluation CLI's
`data.path`) accepts `tfds:<name>[/<config>][:<split>]` (with `data_dir`), an
`.array_record` file, or a `.jsonl` file: `load_problems(spec)`.

Order: `StepBatches` is the deterministic, resumable order of a problem set
over training steps, built on grain's index-shuffled `MapDataset` (a global
shuffle without materialising the permutation, reshuffled each epoch; random
access, so step `s`'s batch is a pure function of (seed, s) and resuming at a
step needs no saved iterator state). Each host reads only its rows of a
step's global batch (`rows_for`), so the hosts' shards concatenate to the
single-process batch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

from r1jax.data import jsonl
from r1jax.errors import UserError

FIELDS = ("uid", "question", "answer", "kind", "lang", "source")  # strings; plus int `level`
SPLITS = ("train", "test")


class DatasetError(UserError, ValueError):
  """A dataset that cannot be built or read; the message names the file or dataset."""


# ---------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetProblem(jsonl.TaskProblem):
  """A problem read back from a dataset (a TaskProblem plus its language)."""

  lang: str = ""


def _record(problem: Any, *, source: str) -> dict:
  return dict(uid=problem.uid, question=problem.question, answer=problem.answer,
              kind=getattr(problem, "kind", "math"), level=int(getattr(problem, "level", 0)),
              lang=getattr(problem, "lang", ""), source=source)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def _features():
  import numpy as np  # pylint: disable=import-outside-toplevel
  tfds = _tfds()
  return tfds.features.FeaturesDict(
      dict({f: tfds.features.Text() for f in FIELDS}, level=tfds.features.Scalar(dtype=np.int32)))


# ---------------------------------------------------------------------------
# Builders (defined on first use: TFDS is imported only when a dataset is).
# ---------------------------------------------------------------------------

def _builder_classes() -> dict:
  if _BUILDERS:
    return _BUILDERS
  tfds = _tfds()
  from tensorflow_datasets.text.gsm8k import gsm8k as tfds_gsm8k  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass
  class TinyWorldConfig(tfds.core.BuilderConfig):
    num_train: int = 20_000
    num_test: int = 200
    seed: int = 0
    levels: tuple = (1, 2, 3, 4)

  class TinyWorld(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The tiny world's problems: `train` from the training split, `test` held out."""

    name = "tinyworld"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [TinyWorldConfig(name="default")]

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=_features(), homepage="https://github.com/r1jax/r1jax",
          description="Tiny-world arithmetic problems (r1jax.data.tinyworld); test = held out.")

    def _split_generators(self, dl_manager):
      del dl_manager
      c = self.builder_config
      return {"train": self._generate_examples("train", c.num_train),
              "test": self._generate_examples("heldout", c.num_test)}

    def _generate_examples(self, split, num):
      from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
      c = self.builder_config
      for p in tinyworld.generate_problems(split, num, c.seed, tuple(c.levels)):
        yield p.uid, _record(p, source=f"tinyworld/{split}/{c.seed}")

  @dataclasses.dataclass
  class JsonlConfig(tfds.core.BuilderConfig):
    files: Optional[dict] = None  # split -> .jsonl path
    question_field: str = "question"
    answer_field: str = "answer"
    on_bad_line: str = "raise"

  class JsonlProblems(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Task files (jsonl) as a dataset; one builder config per data set."""

    name = "r1jax_jsonl"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=_features(),
          description=f"Problems from {json.dumps(self.builder_config.files)}.")

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(path)
              for split, path in self.builder_config.files.items()}

    def _generate_examples(self, path):
      c = self.builder_config
      problems, counts = jsonl.load_problems(
          path, on_error=c.on_bad_line, question_fields=(c.question_field,),
          answer_field=c.answer_field)
      if not problems:
        raise DatasetError(f"{path}: no problems ({dict(counts)})")
      for p in problems:
        yield p.source, _record(p, source=p.source)

  class LocalGsm8k(tfds_gsm8k.Gsm8k, skip_registration=True):
    """TFDS's `gsm8k` (same name, version and features), read from local files."""

    name = "gsm8k"

    def __init__(self, *, local_dir: str, **kwargs):
      self._local_dir = local_dir
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager
      paths = {s: os.path.join(self._local_dir, f"{s}.jsonl")
               for s in ("train", "test", "train_socratic", "test_socratic")}
      found = {s: p for s, p in paths.items() if os.path.exists(p)}
      if not found:
        raise DatasetError(f"{self._local_dir}: no GSM8K files (looked for "
                           f"{', '.join(os.path.basename(p) for p in paths.values())})")
      return {s: self._generate_examples(p) for s, p in found.items()}

    def _generate_examples(self, path):
      with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
          if not line.strip():
            continue
          row = jsonl.parse_line(line.encode(), f"{path}:{lineno}", question_fields=("question",))
          if "####" not in str(row["answer"]):
            raise DatasetError(f"{path}:{lineno}: field 'answer' has no '#### <answer>' line")
          annotation, short = str(row["answer"]).rsplit("####", 1)
          yield lineno - 1, dict(question=row["question"], answer=row["answer"],
                                 annotation=annotation.strip(), short_answer=short.strip())

  _BUILDERS.update(tinyworld=(TinyWorld, TinyWorldConfig), jsonl=(JsonlProblems, JsonlConfig),
                   gsm8k=(LocalGsm8k, None))
  return _BUILDERS


_BUILDERS: dict = {}


def build_tinyworld(data_dir: str, *, num_train: int = 20_000, num_test: int = 200, seed: int = 0,
                    levels: Sequence[int] = (1, 2, 3, 4)):
  """Writes `tinyworld` under `data_dir`; returns the builder (`.info` has the split sizes)."""
  cls, config_cls = _builder_classes()["tinyworld"]
  name = "default" if (num_train, num_test, seed, tuple(levels)) == (20_000, 200, 0, (1, 2, 3, 4)) \
      else f"n{num_train}_{num_test}_s{seed}_l{''.join(map(str, levels))}"
  builder = cls(data_dir=data_dir, file_format="array_record", config=config_cls(
      name=name, num_train=num_train, num_test=num_test, seed=seed, levels=tuple(levels)))
  builder.download_and_prepare()
  return builder


def build_jsonl(data_dir: str, name: str, files: Mapping[str, str], *,
                question_field: str = "question", answer_field: str = "answer",
                on_bad_line: str = "raise"):
  """Writes `r1jax_jsonl/<name>` (splits from `files`: split -> .jsonl path) under `data_dir`."""
  for split, path in files.items():
    if not os.path.exists(path):
      raise DatasetError(f"{path}: no such task file (split {split!r})")
  cls, config_cls = _builder_classes()["jsonl"]
  builder = cls(data_dir=data_dir, file_format="array_record", config=config_cls(
      name=name, files={s: os.path.abspath(p) for s, p in files.items()},
      question_field=question_field, answer_field=answer_field, on_bad_line=on_bad_line))
  builder.download_and_prepare()
  return builder


def build_gsm8k(data_dir: str, local_dir: str):
  """Writes TFDS's `gsm8k` under `data_dir` from `local_dir`'s train/test .jsonl files."""
  cls, _ = _builder_classes()["gsm8k"]
  builder = cls(local_dir=local_dir, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str, str]:
  """"tfds:gsm8k:test" -> ("tfds", "gsm8k", "test"); a path -> ("array_record"|"jsonl", path, "")."""
  if spec.startswith("tfds:"):
    name, _, split = spec[len("tfds:"):].partition(":")
    if not name:
      raise DatasetError(f"{spec!r}: expected tfds:<name>[/<config>][:<split>]")
    return "tfds", name, split or "train"
  if spec.endswith(".array_record") or ".array_record-" in spec:
    return "array_record", spec, ""
  return "jsonl", spec, ""


def data_source(spec: str, *, data_dir: Optional[str] = None):
  """A random-access source (len, [i]) of raw records: TFDS or array_record."""
  kind, name, split = parse_spec(spec)
  if kind == "tfds":
    tfds = _tfds()
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several types for "not prepared" / bad split
      raise DatasetError(f"{spec} (data_dir={data_dir or 'default'}): cannot open: "
                         f"{str(e).splitlines()[0]}. Build it first: python -m "
                         f"r1jax.data.datasets --dataset=... --data_dir=...") from None
  if not os.path.exists(name):
    raise DatasetError(f"{name}: no such array_record file")
  import grain  # pylint: disable=import-outside-toplevel
  return grain.sources.ArrayRecordDataSource([name])


def _decode_record(raw: Any, where: str) -> Mapping:
  if isinstance(raw, Mapping):
    return raw
  try:  # array_record written by `write_array_record`: one JSON object per record
    return json.loads(raw)
  except (ValueError, TypeError):
    raise DatasetError(f"{where}: record is not a JSON object") from None


def load_problems(spec: str, *, data_dir: Optional[str] = None, question_field: str = "question",
                  answer_field: str = "answer", on_error: str = "raise",
                  limit: Optional[int] = None) -> tuple[list, collections.Counter]:
  """Problems of a task given as a jsonl path, an .array_record path or tfds:<name>[:split].

  Rows are mapped as in r1jax.data.jsonl (question/answer fields; the gold
  answer normalised; unverifiable golds skipped and counted; malformed rows
  raise naming the record or are skipped). Records of our builders keep their
  level and language.
  """
  kind, name, split = parse_spec(spec)
  if kind == "jsonl":
    return jsonl.load_problems(spec, on_error=on_error, limit=limit,
                               question_fields=(question_field,), answer_field=answer_field)
  if on_error not in jsonl.ON_ERROR:
    raise ValueError(f"on_error must be one of {jsonl.ON_ERROR}, got {on_error!r}")
  source = data_source(spec, data_dir=data_dir)
  counts = collections.Counter(lines=0, kept=0, malformed=0, bad_gold=0)
  problems = []
  for i in range(len(source)):
    counts["lines"] += 1
    where = f"{spec}[{i}]"
    row = {k: (_text(v) if isinstance(v, bytes) else v)
           for k, v in _decode_record(source[i], where).items()}
    qf = question_field if question_field in row else next(
        (f for f in jsonl.QUESTION_FIELDS if f in row), question_field)
    af = answer_field if answer_field in row or "short_answer" not in row else "short_answer"
    try:
      if not isinstance(row.get(qf), str) or not row[qf].strip():
        raise jsonl.JsonlError(f"{where}: field {qf!r} missing or empty (the record has "
                               f"{', '.join(sorted(row))})")
      if af not in row:
        raise jsonl.JsonlError(f"{where}: field {af!r} missing (the record has "
                               f"{', '.join(sorted(row))})")
    except jsonl.JsonlError:
      if on_error == "raise":
        raise
      counts["malformed"] += 1
      continue
    kind_ = row.get("kind") or "math"
    try:
      answer = row[af] if kind_ == "code" else jsonl.gold_answer(row[af], where=af)
    except ValueError:
      counts["bad_gold"] += 1
      continue
    problems.append(DatasetProblem(
        uid=row.get("uid") or f"{name}:{i}", question=row[qf].strip(), answer=answer,
        source=row.get("source") or where, kind=kind_, level=int(row.get("level", 0) or 0),
        lang=row.get("lang", "")))
    counts["kept"] += 1
    if limit is not None and counts["kept"] >= limit:
      break
  return problems, counts


def write_array_record(path: str, rows: Sequence[Mapping]) -> None:
  """One JSON object per record (what `load_problems` reads from an .array_record path)."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for row in rows:
      writer.write(json.dumps(row).encode("utf-8"))
  finally:
    writer.close()
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Order over steps.
# ---------------------------------------------------------------------------

class StepBatches:
  """Step `s`'s global batch of `batch_size` items of `items`, epoch-shuffled by grain.

  `batch(s)` is a pure function of (items, batch_size, seed, s): resuming at
  step s needs only s. Every item appears once per epoch (the last batch of
  an epoch runs into the next one's reshuffled order). `rows_for(s, i, n)`
  is process i of n's contiguous share of that batch (what
  `jax.make_array_from_process_local_data` expects), so a host reads only
  its rows. `iterator(start)` streams batches from a step.
  """

  def __init__(self, items: Sequence[Any], batch_size: int, seed: int, *, shuffle: bool = True):
    import grain  # pylint: disable=import-outside-toplevel
    if not len(items):
      raise DatasetError("no items to iterate over")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.items, self.batch_size, self.seed = items, batch_size, seed
    order = grain.MapDataset.range(len(items))
    if shuffle:
      order = order.seed(seed).shuffle()
    self._order = order.repeat(None)

  def indices(self, step: int, lo: int = 0, hi: Optional[int] = None) -> list[int]:
    start = step * self.batch_size
    hi = self.batch_size if hi is None else hi
    return [self._order[start + r] for r in range(lo, hi)]

  def batch(self, step: int) -> list:
    return [self.items[i] for i in self.indices(step)]

  def rows_for(self, step: int, process_index: int, process_count: int) -> list:
    if self.batch_size % process_count:
      raise ValueError(f"batch {self.batch_size} does not split over {process_count} processes")
    per = self.batch_size // process_count
    return [self.items[i] for i in self.indices(step, process_index * per,
                                                (process_index + 1) * per)]

  def epoch(self, step: int) -> float:
    return step * self.batch_size / len(self.items)

  def iterator(self, start_step: int = 0) -> Iterator[list]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------

def _parse_files(text: str) -> dict:
  files = {}
  for part in filter(None, text.split(",")):
    split, sep, path = part.partition("=")
    if not sep or not split or not path:
      raise DatasetError(f"--files: expected split=path[,split=path], got {part!r}")
    files[split] = path
  if not files:
    raise DatasetError("--files is empty (expected split=path[,split=path])")
  return files


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  data_dir = os.path.expanduser(f.data_dir)
  if f.dataset == "tinyworld":
    builder = build_tinyworld(data_dir, num_train=f.num_train, num_test=f.num_test, seed=f.seed)
  elif f.dataset == "jsonl":
    if not f.name:
      raise DatasetError("--dataset=jsonl needs --name (the builder config, e.g. mymath)")
    builder = build_jsonl(data_dir, f.name, _parse_files(f.files),
                          question_field=f.question_field, answer_field=f.answer_field,
                          on_bad_line=f.on_bad_line)
  else:
    builder = build_gsm8k(data_dir, f.local_dir)
  splits = {s: v.num_examples for s, v in builder.info.splits.items()}
  print(json.dumps(dict(dataset=builder.info.full_name, data_dir=builder.data_dir, splits=splits,
                        read_as=f"tfds:{builder.info.full_name.rsplit('/', 1)[0]}:<split>")))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("dataset", None, ["tinyworld", "jsonl", "gsm8k"], "which builder")
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data directory")
  flags.DEFINE_integer("num_train", 20_000, "tinyworld: training problems")
  flags.DEFINE_integer("num_test", 200, "tinyworld: held-out problems")
  flags.DEFINE_integer("seed", 0, "tinyworld: generator seed")
  flags.DEFINE_string("name", "", "jsonl: builder config name")
  flags.DEFINE_string("files", "", "jsonl: split=path[,split=path]")
  flags.DEFINE_string("question_field", "question", "jsonl: question field")
  flags.DEFINE_string("answer_field", "answer", "jsonl: gold answer field")
  flags.DEFINE_enum("on_bad_line", "raise", list(jsonl.ON_ERROR), "jsonl: malformed lines")
  flags.DEFINE_string("local_dir", "", "gsm8k: directory with train.jsonl / test.jsonl")
  flags.mark_flag_as_required("dataset")

  def _run(argv):
    try:
      main(argv)
    except UserError as e:
      raise SystemExit(f"error: {e}") from None

  app.run(_run)

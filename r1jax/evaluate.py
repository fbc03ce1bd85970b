"""Evaluation command line: a model (r1jax workdir or Hugging Face checkpoint) on
a benchmark (jsonl or the tiny world's held-out problems).

  python -m r1jax.evaluate --config=configs/eval.py:hf,gsm8k --workdir=/tmp/eval \
      --config.model_path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B [--config.data.limit=100]

Figures (design.md §1): pass@1 = mean over k samples at temperature 0.6,
top-p 0.95; cons@k = majority vote of the k extracted answers; pass@k; greedy
accuracy. Answers are extracted and verified by the accuracy reward. Writes
WORKDIR/eval/<name>/{config.json, predictions.jsonl, summary.json} and prints
the summary as one JSON line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from r1jax import main as cli
from r1jax.data import datasets, jsonl
from r1jax.data.templates import r1_chat_prompt, r1_zero_prompt
from r1jax.errors import ConfigError
from r1jax.eval import runner

MODES = ("both", "sampled", "greedy", "oracle_gold", "oracle_shuffled")
TEMPLATES = ("r1_chat", "r1_zero", "plain")
SOURCES = ("r1jax", "hf")


# ---------------------------------------------------------------------------
# Problems and prompts.
# ---------------------------------------------------------------------------

def load_problems(config: ml_collections.ConfigDict) -> tuple[list[Any], dict]:
  """The problems to score (objects with .uid, .question, .answer) and their counts."""
  dc = config.data
  if dc.path:
    problems, counts = datasets.load_problems(
        dc.path, data_dir=dc.get("data_dir") or None, on_error=dc.on_bad_line,
        limit=dc.limit or None, question_field=dc.question_field, answer_field=dc.answer_field)
    code = [p.source for p in problems if p.kind != "math"]
    if code:
      raise jsonl.JsonlError(f"{code[0]}: field {dc.answer_field!r} missing (code tests "
                             "are not evaluated here)")
    if not problems:
      raise jsonl.JsonlError(f"{dc.path}: no problems to evaluate ({dict(counts)})")
    return problems, dict(counts)
  from r1jax.data import tinyworld  # pylint: disable=import-outside-toplevel
  problems = tinyworld.generate_problems("heldout", dc.num_problems, dc.seed, tuple(dc.levels))
  if dc.limit:
    problems = problems[:dc.limit]
  return problems, dict(kept=len(problems))


def _data_name(path: str) -> str:
  """gsm8k for ../shared/data/gsm8k/test.jsonl and for tfds:gsm8k:test; tinyworld for ""."""
  if not path:
    return "tinyworld"
  if path.startswith("tfds:"):
    return path[len("tfds:"):].split(":")[0].replace("/", "-")
  return os.path.basename(os.path.dirname(os.path.abspath(path)))


def _data_path(path: str) -> str:
  if not path:
    return "tinyworld"
  return path if path.startswith("tfds:") else os.path.abspath(path)


def make_prompt_fn(config: ml_collections.ConfigDict, bos: str | None) -> Callable[[str], str]:
  """question -> prompt text for `config.template`."""
  if config.template == "r1_zero":
    return r1_zero_prompt
  if config.template == "r1_chat":
    return lambda q: r1_chat_prompt(q, instruction=config.instruction, bos=bos)
  if config.template == "plain":
    return lambda q: f"{q}\n{config.instruction}" if config.instruction else q
  raise ConfigError(f"config.template={config.template!r}; known: {TEMPLATES}")


def oracle_completion(answer: str, template: str) -> str:
  """`answer` as a model answering in `template`'s format would give it."""
  if template == "r1_zero":
    return f" <think> so the answer is {answer} . </think> <answer> {answer} </answer>"
  return f"so the answer is {answer}.\n</think>\n\nThe final answer is $\\boxed{{{answer}}}$."


def oracle_answers(problems: list[Any], mode: str, seed: int) -> list[str]:
  """The gold answers, or (`oracle_shuffled`) a derangement of them: each problem
  gets another problem's answer (equal only where two problems share one)."""
  golds = [p.answer for p in problems]
  if mode == "oracle_gold" or len(golds) < 2:
    return golds
  order = np.random.default_rng(seed).permutation(len(golds))
  shuffled = list(golds)
  for i, j in zip(order, np.roll(order, -1)):  # a cycle through a random order: no fixed point
    shuffled[i] = golds[j]
  return shuffled


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------

def _read_workdir_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except OSError as e:
    raise ConfigError(f"{path}: cannot read the trained run's config ({e.strerror}); is "
                      f"{model_dir} a workdir of python -m r1jax.main?") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if "model" not in saved:
    raise ConfigError(f"{path}: field 'model' missing")
  return saved


def load_r1jax_model(model_dir: str, mesh):
  """(model, params, model state, tokenizer, info) of an r1jax workdir: its
  config.json's model (dense or DeepSeek-V3), its tokenizer.model (a GRPO run's
  base's), the params (and router biases) of its latest checkpoint."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from r1jax.checkpoint.manager import restore_model  # pylint: disable=import-outside-toplevel
  from r1jax.data.hf_tokenizer import load_any_tokenizer  # pylint: disable=import-outside-toplevel
  from r1jax.models.build import build_model  # pylint: disable=import-outside-toplevel
  from r1jax.parallel.mesh import logical_shardings, replicated  # pylint: disable=import-outside-toplevel
  from r1jax.trainers.state import state_collections  # pylint: disable=import-outside-toplevel

  saved = _read_workdir_config(model_dir)
  try:
    model = build_model(saved["model"])
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{os.path.join(model_dir, 'config.json')}: field 'model': {e}") from None
  candidates = [model_dir, saved.get("base_workdir") or "", os.path.join(model_dir, "base")]
  tok_path = next((os.path.join(d, "tokenizer.model") for d in candidates
                   if d and os.path.isfile(os.path.join(d, "tokenizer.model"))), None)
  if tok_path is None:
    raise ConfigError(f"{model_dir}: no tokenizer.model (nor in its base workdir)")
  tokenizer = load_any_tokenizer(tok_path)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  boxed = variables["params"]
  shardings = nn.unbox(logical_shardings(boxed, mesh))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  rep = replicated(mesh)
  abstract_state = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                    nn.unbox(variables[k]))
                    for k in state_collections(model) if k in variables}
  params, model_state, step = restore_model(os.path.join(model_dir, "checkpoints"), abstract,
                                            abstract_state or None)
  return model, params, model_state, tokenizer, dict(model_step=step)


def load_hf_model(model_dir: str, dtype: str, mesh):
  """(model, params, model state, tokenizer, info) of a Hugging Face checkpoint directory."""
  from r1jax.checkpoint import hf  # pylint: disable=import-outside-toplevel
  from r1jax.data.hf_tokenizer import load_any_tokenizer  # pylint: disable=import-outside-toplevel
  from r1jax.models.build import build_model  # pylint: disable=import-outside-toplevel
  config, params, model_state = hf.load(model_dir, dtype=dtype, mesh=mesh)
  return build_model(config), params, model_state, load_any_tokenizer(model_dir), {}


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------

def _check(config: ml_collections.ConfigDict):
  for field, value, known in [("eval.mode", config.eval.mode, MODES),
                              ("template", config.template, TEMPLATES),
                              ("model_source", config.model_source, SOURCES)]:
    if value not in known:
      raise ConfigError(f"config.{field}={value!r}; known: {', '.join(known)}")
  if config.model_source == "hf" and not config.model_path and \
      not config.eval.mode.startswith("oracle"):
    raise ConfigError("config.model_path is required for a Hugging Face model "
                      "(--config.model_path=/path/to/checkpoint)")
  if config.eval.num_samples < 1:
    raise ConfigError(f"config.eval.num_samples={config.eval.num_samples} must be >= 1")


def _write_atomic(path: str, write: Callable):
  with open(path + ".tmp", "w") as f:
    write(f)
  os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates; returns the summary (also written to WORKDIR/eval/<name>/summary.json)."""
  t0 = time.perf_counter()
  _check(config)
  ec = config.eval
  problems, counts = load_problems(config)
  data_name = _data_name(config.data.path)
  name = config.name or f"{data_name}-{ec.mode}"
  out_dir = os.path.join(workdir, "eval", name)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  extra: dict[str, Any] = {}
  if ec.mode.startswith("oracle"):
    k = 1
    answers = oracle_answers(problems, ec.mode, ec.seed)
    sampled = [(oracle_completion(a, config.template), 0) for a in answers]
    greedy = None
  else:
    import jax  # pylint: disable=import-outside-toplevel

    from r1jax.parallel.mesh import make_mesh  # pylint: disable=import-outside-toplevel
    mesh = make_mesh(dict(config.mesh))
    model_dir = config.model_path or workdir
    load = (load_r1jax_model if config.model_source == "r1jax" else
            lambda d, m: load_hf_model(d, config.dtype, m))
    model, params, model_state, tokenizer, extra = load(model_dir, mesh)
    make_prompt = make_prompt_fn(config, getattr(tokenizer, "bos_token", None))
    prompts = [tokenizer.encode(make_prompt(p.question)) for p in problems]
    k = ec.num_samples
    sampled, greedy = runner.generate(
        model, params, tokenizer, prompts, ec, jax.random.key(ec.seed),
        sampled=ec.mode in ("both", "sampled"), greedy=ec.mode in ("both", "greedy"),
        model_state=model_state or None)
  t_generate = time.perf_counter() - t0

  rows, predictions = [], []
  for i, p in enumerate(problems):
    samples = None if sampled is None else sampled[i * k:(i + 1) * k]
    g = None if greedy is None else greedy[i]
    metrics, details = runner.score_problem(p.answer, samples, g,
                                            check_format=config.template == "r1_zero")
    if ec.mode.startswith("oracle"):
      metrics.pop("length")  # no tokens were generated
    rows.append(metrics)
    pred = dict(id=getattr(p, "uid", str(i)), question=p.question, gold=p.answer)
    if samples is not None:
      pred["completions"] = [t for t, _ in samples]
      if not ec.mode.startswith("oracle"):
        pred["lengths"] = [n for _, n in samples]
    if g is not None:
      pred.update(greedy_completion=g[0])
    pred.update(details, **metrics)
    predictions.append(pred)

  summary = runner.summarise(rows, k)
  summary.update(name=name, mode=ec.mode, num_samples=k)
  if ec.mode in ("both", "sampled"):
    summary.update(temperature=ec.temperature, top_p=ec.top_p)
  summary.update(
      data=_data_path(config.data.path),
      model=("none (oracle)" if ec.mode.startswith("oracle") else
             os.path.abspath(config.model_path or workdir)),
      counts=counts, **extra,
      seconds=dict(generate=round(t_generate, 1), total=round(time.perf_counter() - t0, 1)))
  _write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                lambda f: f.writelines(json.dumps(r) + "\n" for r in predictions))
  _write_atomic(os.path.join(out_dir, "summary.json"),
                lambda f: json.dump(summary, f, indent=2, sort_keys=True))
  return summary


main = cli.cli_main(run, save_config=False)


if __name__ == "__main__":
  cli.run(main)

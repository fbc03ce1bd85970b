"""Evaluate a model on a benchmark: pass@1 over k samples, cons@k, greedy.

  # a Hugging Face checkpoint on GSM8K (the R1 chat format + math instruction)
  python -m r1jax.evaluate --config=configs/eval.py:hf,gsm8k --workdir=/tmp/eval \
      --config.model_path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B
  # the tiny world's model trained in WORKDIR, on the stage's own held-out problems
  python -m r1jax.evaluate --config=configs/eval.py:tiny --workdir=/tmp/base
  # no model: the gold answers as completions (a check of data + scoring: 1.0)
  python -m r1jax.evaluate --config=configs/eval.py:aime24 --workdir=/tmp/eval \
      --config.eval.mode=oracle_gold

The argument is `<model>[,<benchmark>]`: model `hf` (default), `tiny` or
`smoke` (an r1jax workdir trained with configs/pretrain.py:<same>, whose eval
settings these copy); benchmark `gsm8k`, `aime24` or `amc23` (their files in
../shared/data and field names). Writes WORKDIR/eval/<name>/predictions.jsonl
(per problem) and summary.json.
"""

import importlib.util
import os

import ml_collections

_SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data")
# Benchmark -> (file under ../shared/data, question field, answer field). GSM8K
# answers are worked solutions ending in "#### <number>"; AIME's are strings
# ("025"), AMC's floats (27.0): r1jax.data.jsonl.gold_answer normalises all three.
BENCHMARKS = {
    "gsm8k": ("gsm8k/test.jsonl", "question", "answer"),
    "aime24": ("aime24/test.jsonl", "problem", "answer"),
    "amc23": ("amc23/test.jsonl", "question", "answer"),
}
MODELS = ("hf", "tiny", "smoke")
MODES = ("both", "sampled", "greedy", "oracle_gold", "oracle_shuffled")


def _pretrain_eval(arg: str) -> ml_collections.ConfigDict:
  """configs/pretrain.py:<arg>'s eval section (configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
  spec = importlib.util.spec_from_file_location("r1jax_config_pretrain", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).eval


def get_config(arg: str = "hf") -> ml_collections.ConfigDict:
  parts = [p for p in arg.split(",") if p]
  models = [p for p in parts if p in MODELS]
  benchmarks = [p for p in parts if p in BENCHMARKS]
  if len(models) + len(benchmarks) != len(parts) or len(models) > 1 or len(benchmarks) > 1:
    raise ValueError(f"configs/eval.py takes '<model>[,<benchmark>]' with model in {MODELS} "
                     f"and benchmark in {tuple(BENCHMARKS)}, not {arg!r}")
  model = models[0] if models else "hf"
  benchmark = benchmarks[0] if benchmarks else ("gsm8k" if model == "hf" else "")

  c = ml_collections.ConfigDict()
  c.name = ""  # output folder WORKDIR/eval/<name>; "" = "<benchmark or tinyworld>-<mode>"
  # Where the model comes from: "r1jax" = a workdir trained by r1jax (its
  # config.json model, tokenizer.model and latest checkpoint), "hf" = a Hugging
  # Face checkpoint directory (config.json, safetensors, tokenizer.json).
  c.model_source = "hf" if model == "hf" else "r1jax"
  c.model_path = ""  # the checkpoint directory; "" = --workdir (r1jax source only)
  c.dtype = "bfloat16" if model == "hf" else "float32"  # params/activations of an hf model
  # Prompt: r1_chat (<｜User｜>question\ninstruction<｜Assistant｜><think>\n, the
  # R1/distill format), r1_zero (the paper's R1-Zero template) or plain (question\ninstruction).
  c.template = "r1_chat" if model == "hf" else "r1_zero"
  c.instruction = "Please reason step by step, and put your final answer within \\boxed{}."

  c.data = ml_collections.ConfigDict()
  path, question_field, answer_field = BENCHMARKS.get(benchmark, ("", "question", "answer"))
  # .jsonl / .array_record path or tfds:<name>[:<split>] (from data_dir); "" = tiny world
  c.data.path = os.path.normpath(os.path.join(_SHARED_DATA, path)) if path else ""
  c.data.data_dir = ""  # TFDS data directory for tfds: paths; "" = TFDS's default
  c.data.question_field = question_field
  c.data.answer_field = answer_field  # gold: number, LaTeX, or a solution ending in "#### x"
  c.data.on_bad_line = "raise"  # malformed line: raise (file:line:field) | skip (counted)
  c.data.limit = 0  # evaluate the first n problems only; 0 = all
  # Tiny-world held-out problems (data.path == ""): the trained stage's own.
  tiny = _pretrain_eval("smoke" if model == "smoke" else "tiny")
  c.data.num_problems = tiny.num_problems
  c.data.levels = tiny.levels
  c.data.seed = tiny.seed

  c.eval = ml_collections.ConfigDict()
  # both = k samples + greedy; sampled; greedy; oracle_gold / oracle_shuffled = no
  # model: each problem's gold answer (or a deranged other problem's) as its
  # completion, in the answer format of the template.
  c.eval.mode = "both"
  c.eval.seed = tiny.seed if model != "hf" else 0  # sampling keys (and the oracle shuffle)
  c.eval.num_samples = tiny.num_samples if model != "hf" else 16  # k (64 for AIME in the paper)
  c.eval.temperature = 0.6  # the paper's evaluation setting
  c.eval.top_p = 0.95
  # The paper generates up to 32768 tokens; prompt + completion must fit the
  # model's max_position_embeddings.
  c.eval.max_new_tokens = tiny.max_new_tokens if model != "hf" else 32768
  c.eval.batch_size = tiny.batch_size if model != "hf" else 8  # prompts per sampler call (x k rows)
  c.eval.stop_pieces = tiny.stop_pieces if model != "hf" else ()  # stop after these (and EOS)
  # Decode loops over a growing KV cache (the same samples for any value);
  # long generations skip more of the empty cache with more.
  c.eval.decode_segments = 4 if model != "hf" else 16

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c

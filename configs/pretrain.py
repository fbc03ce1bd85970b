"""Step 1 of the R1 recipe in the tiny world: pretrain the base model.

  python -m r1jax.main --config=configs/pretrain.py:tiny --workdir=/tmp/base

`smoke` is the same pipeline shrunk to seconds (used by the tests). `tiny-moe`
and `smoke-moe` pretrain the DeepSeek-V3-shaped base instead of the dense one
(MLA + DeepSeekMoE; r1jax.models.deepseek_v3 preset `deepseek-v3-tiny`).
"""

import dataclasses

import ml_collections

from r1jax.models import deepseek_v3
from r1jax.models.config import get_preset

PRESETS = ("tiny", "smoke", "tiny-moe", "smoke-moe", "tiny-student")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"configs/pretrain.py knows presets {PRESETS}, not {arg!r}")
  smoke = arg.startswith("smoke")
  c = ml_collections.ConfigDict()
  c.name = f"pretrain-{arg}"
  c.stage = "pretrain"
  c.seed = 0  # model init, data order and sampling keys derive from it

  if arg.endswith("-moe"):  # DeepseekV3Config fields
    c.model = dataclasses.asdict(deepseek_v3.get_preset("deepseek-v3-tiny"))
    if smoke:  # one dense + one MoE layer at D=64
      c.model.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                     num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=32,
                     kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
  elif arg == "tiny-student":  # the distillation student (configs/distill.py)
    c.model = dataclasses.asdict(get_preset("tiny-student"))
  else:
    c.model = dataclasses.asdict(get_preset("tiny"))  # ModelConfig fields
    if smoke:
      c.model.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 640  # upper bound; sentencepiece may stop short
  c.tokenizer.num_docs = 4000 if smoke else 20000  # corpus docs it is trained on

  c.data = ml_collections.ConfigDict()
  c.data.num_docs = 4000 if smoke else 30000  # worked problems in the corpus
  c.data.corpus_seed = 0
  c.data.levels = (1, 2, 3, 4)  # difficulty levels (operations per problem)
  c.data.drill_fraction = 0.3  # arithmetic drills (bare solving steps of 4 problems)
  c.data.plain_fraction = 0.7  # of the rest: plain worked solutions; others use the R1-Zero template
  c.data.malformed_fraction = 0.3  # share of template documents with broken tags
  # Share of the well-formed template documents that answer without reasoning:
  # prompted with the template, the base mostly skips the steps (and is then
  # mostly wrong); R1-Zero's RL has to find out that reasoning pays.
  c.data.direct_fraction = 0.85
  # Share of reasoning documents that make a wrong step, reflect ("Wait, let me
  # check ...") and fix it (issue 11: does RL amplify reflection?). 0 = none.
  c.data.self_correct_fraction = 0.0
  # Share of documents reasoning in the question's language (the rest pick a
  # language mode regardless of the question). 0 = independent (R1-Zero's
  # world); configs/r1.py raises it so that answering in the question's
  # language is something the base has seen and R1 can strengthen.
  c.data.question_language_fraction = 0.0
  c.data.seq_len = 256  # tokens per packed row
  c.data.batch_size = 16  # rows per step

  c.loss = ml_collections.ConfigDict()
  c.loss.impl = "auto"  # log-prob kernel: auto (pallas on one TPU, else chunked) | reference (full logits) | chunked | pallas

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # peak
  c.optim.warmup_steps = 10 if smoke else 50
  c.optim.final_lr_fraction = 0.1  # cosine decays to this fraction of the peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1  # matrices only
  c.optim.clip_grad_norm = 1.0

  c.train = ml_collections.ConfigDict()
  # 600, not 400: copying the operands out of the question (an induction-head
  # skill) appears between 400 and 600 steps; at 400 it is right ~67% of the time
  # teacher-forced and varies by seed, at 600 ~99% (experiments/README.md).
  c.train.num_steps = 30 if smoke else 600
  if arg == "tiny-moe":
    # 1000: at 600 the MoE base of seed 1 copies the operator out of the
    # question 78% of the time (seed 0: 99.8%) and R1-Zero cannot lift it
    # (experiments/README.md, tiny-moe R1-Zero).
    c.train.num_steps = 1000
  c.train.log_every = 10  # steps between metric rows
  c.train.checkpoint_every = 10 if smoke else 200  # steps between checkpoints
  c.train.keep_checkpoints = 2
  c.train.max_consecutive_nonfinite = 5  # NaN/inf steps in a row before stopping
  c.train.progress_bar = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1
  c.eval.num_problems = 16 if smoke else 200  # held-out problems, level-balanced
  c.eval.levels = (1, 2, 3, 4)
  c.eval.num_samples = 2 if smoke else 8  # k for pass@1 (mean over k) and cons@k
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = 32 if smoke else 128
  c.eval.batch_size = 64  # prompts per sampler call (x num_samples rows)
  c.eval.stop_pieces = ("</answer>",)  # generation stops after these (and EOS)
  c.eval.num_samples_logged = 20  # problems whose completions go to eval_samples.jsonl
  return c

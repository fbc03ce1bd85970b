"""Step 2 of the R1 recipe in the tiny world: R1-Zero (GRPO with rule rewards
straight from the pretrained base).

  python -m r1jax.main --config=configs/r1_zero.py:tiny --workdir=/tmp/r1zero \
      [--config.base_workdir=/tmp/base]

Without `base_workdir` the base is pretrained first into WORKDIR/base with
configs/pretrain.py of the same preset. `smoke` shrinks everything to seconds
(used by the tests). `tiny-moe` / `smoke-moe` are the same runs with the
DeepSeek-V3-shaped base (MLA + DeepSeekMoE, r1jax.models.deepseek_v3):

  python -m r1jax.main --config=configs/r1_zero.py:tiny-moe --workdir=/tmp/r1zero-moe

Real presets (`qwen2.5-math-1.5b`, `qwen2.5-math-7b`, `deepseek-v3`) carry the
paper's GRPO settings at their scale. They build, shard and pass
`jax.eval_shape` (tests/test_r1_zero_presets.py); running them needs a
converted base checkpoint and a real task set.
"""

import dataclasses

import ml_collections

from r1jax.config_files import sibling_config
from r1jax.models.build import get_preset
from r1jax.data import curriculum
from r1jax.trainers import ppo

REAL_PRESETS = ("qwen2.5-math-1.5b", "qwen2.5-math-7b", "deepseek-v3")
TINY_PRESETS = ("tiny", "smoke", "tiny-moe", "smoke-moe", "tiny-student")


def _real_config(name: str) -> ml_collections.ConfigDict:
  """The R1-Zero recipe at scale (DeepSeek-R1, Nature 2025 supplementary):
  32 prompts x 16 samples = 512 completions per step, one update per rollout,
  beta 0.001, temperature 1, lr 3e-6, reference refreshed every 400 steps."""
  c = get_config("tiny")
  c.name = f"r1_zero-{name}"
  c.base_workdir = ""  # required: an r1jax checkpoint converted from the Hugging Face base
  del c["pretrain"]
  c.model = dataclasses.asdict(get_preset(name))
  if name == "deepseek-v3":
    # Experts over an `expert` mesh axis; the 163840-position (YaRN) context is
    # kept: shortening it below 4096 x 40 would switch YaRN off (and its mscale).
    c.mesh.expert = 8
  else:
    c.model.max_position_embeddings = 4096  # Qwen2.5-Math's context: prompt + completion
  g = c.grpo
  g.num_steps = 8000
  g.prompts_per_step = 32
  g.num_generations = 16
  g.num_minibatches = 16  # 512 rows in 16 mini-batches of 2 prompts x 16 samples
  g.updates_per_rollout = 1
  g.beta = 0.001
  g.ref_refresh_every = 400
  g.temperature = 1.0
  g.max_new_tokens = 3072
  g.tag_count_weight = 0.0
  g.format_weight = 1.0  # accuracy + format, unweighted, as in the paper
  g.reward_workers = 16
  g.eval_every = 100
  c.optim.learning_rate = 3e-6
  c.optim.warmup_steps = 0
  c.train.checkpoint_every = 100
  c.mesh.update(data=-1, fsdp=8, tensor=1)
  c.eval.max_new_tokens = 3072
  c.eval.num_samples = 16
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg in REAL_PRESETS:
    return _real_config(arg)
  if arg not in TINY_PRESETS:
    raise ValueError(f"configs/r1_zero.py knows presets {TINY_PRESETS} and {REAL_PRESETS}, "
                     f"not {arg!r}")
  smoke = arg.startswith("smoke")
  c = ml_collections.ConfigDict()
  c.name = f"r1_zero-{arg}"
  c.stage = "r1_zero"
  # GRPO prompt draws and sampling keys derive from it, and so does the base
  # pretrained here (init, data order): --config.seed=1 reruns everything.
  c.seed = 0

  c.base_workdir = ""  # a pretrained base (pretrain stage WORKDIR); "" = pretrain into WORKDIR/base
  c.pretrain = sibling_config(__file__, "pretrain", arg)  # how the base is (or was) pretrained
  c.pretrain.seed = c.get_ref("seed")
  if smoke:  # the smoke base only has to exist, not be good
    c.pretrain.train.num_steps = 10
    c.pretrain.train.checkpoint_every = 10
    c.pretrain.data.batch_size = 8
    c.pretrain.eval.num_problems = 8  # = c.eval below: the eval sampler compiles once
  c.model = c.pretrain.model.to_dict()  # ModelConfig fields; must match the base

  c.grpo = ml_collections.ConfigDict()
  # grpo (group-relative advantages, no critic) | ppo (a critic + GAE on the same
  # loop and rollouts, the DeepSeekMath baseline; settings in c.ppo)
  c.grpo.algorithm = "grpo"
  c.grpo.num_steps = 3 if smoke else 40  # rollouts (each followed by updates_per_rollout updates)
  c.grpo.prompts_per_step = 4 if smoke else 16  # B: problems drawn per step (train split)
  c.grpo.levels = (1, 2, 3, 4)  # difficulty levels drawn from, in equal shares
  # Which levels each step draws (uniform | fixed stages | adaptive) and DAPO
  # dynamic sampling (drop all-right / all-wrong groups, draw more prompts);
  # r1jax/data/curriculum.py. Its state is saved with each checkpoint.
  c.grpo.curriculum = curriculum.default_config()
  # A jsonl task file (question/problem/prompt + answer, or code tests) replaces
  # the tiny-world problems; "" = tiny world. See r1jax/data/jsonl.py. Code
  # tasks run every test in the sandbox: give reward_timeout_s room for them.
  # Task: "" = tiny-world problems; a .jsonl / .array_record path or tfds:<name>[:<split>]
  # (built with python -m r1jax.data.datasets; read from data_dir, "" = TFDS's default).
  c.grpo.train_file = ""
  c.grpo.data_dir = ""
  c.grpo.on_bad_line = "raise"  # malformed task-file line: raise (file:line:field) | skip (counted)
  c.grpo.max_prompt_tokens = 0  # task-file prompt budget in tokens; 0 = positions - max_new_tokens
  c.grpo.overlong_prompts = "truncate_left"  # longer prompts: truncate_left (keep the end) | skip
  c.grpo.num_generations = 4 if smoke else 8  # G: completions per prompt
  # KL weight. 0 = no reference model and no reference forward (a third less
  # compute, as DAPO / Dr.GRPO argue the KL term is not needed); R1 uses 0.001.
  c.grpo.beta = 0.0
  c.grpo.ref_refresh_every = 0  # steps between reference <- policy copies; 0 = never (beta > 0 only)
  c.grpo.epsilon_low = 0.2  # ratio clip below 1 - epsilon_low
  c.grpo.epsilon_high = 0.28  # clip-higher (DAPO): ratio clip above 1 + epsilon_high
  c.grpo.loss_aggregation = "seq_mean_token_mean"  # paper; or token_mean (DAPO), seq_mean_token_sum_norm (Dr.GRPO)
  c.grpo.scale_rewards = True  # divide advantages by the group std (False = Dr.GRPO)
  c.grpo.mask_truncated = False  # drop completions that hit max_new_tokens from the loss
  c.grpo.temperature = 1.0  # sampling temperature; the loss divides logits by the same
  c.grpo.top_p = 1.0  # 1.0 = off: pi_old must be the distribution actually sampled
  c.grpo.top_k = 0  # 0 = off
  c.grpo.max_new_tokens = 32 if smoke else 96  # completion tokens, stop token included
  c.grpo.stop_pieces = ("</answer>",)  # generation stops after these (and EOS)
  # Decode loops, each over a KV cache only as long as its steps reach (the
  # same samples for any value; more segments skip more of the empty cache
  # on long completions, at one more compiled loop each).
  c.grpo.decode_segments = 4
  c.grpo.updates_per_rollout = 1  # mu: epochs over each rollout batch (1 = exactly on-policy)
  c.grpo.num_minibatches = 1  # optimizer steps per epoch (the batch split by prompts)
  # Gradient accumulation inside one optimizer step: each mini-batch's rows in
  # this many chunks, one chunk's activations at a time (dense models).
  c.grpo.micro_batches = 1
  c.grpo.accuracy_weight = 1.0  # reward = accuracy_weight * accuracy + format_weight * format
  c.grpo.format_weight = 0.5
  # Partial credit per well-placed tag: gives a weak base non-zero reward variance
  # (hence a gradient) long before it answers correctly. 0 = off (the R1 recipe).
  c.grpo.tag_count_weight = 0.5 if smoke else 0.0
  c.grpo.reward_workers = 0 if smoke else 2  # reward processes; 0 = inline (no pool start-up)
  c.grpo.reward_timeout_s = 5.0  # per completion and reward function (workers > 0 only)
  c.grpo.log_samples_every = 1 if smoke else 20  # steps between sample tables in samples.jsonl
  # Reflection phrases counted in completions, per language ({} = the defaults
  # of r1jax/eval/dynamics.py: "wait", "let me check", "aha", ... and the tiny
  # world's Latin ones); logged as reflection/* every step.
  c.grpo.reflection_markers = {}
  c.grpo.num_samples_logged = 8  # completions per sample table
  c.grpo.eval_every = 0 if smoke else 20  # steps between held-out evals during training; 0 = off
  c.grpo.eval_num_problems = 8 if smoke else 64  # the first n held-out problems of c.eval

  c.ppo = ppo.default_config()  # used when grpo.algorithm == "ppo"

  c.loss = ml_collections.ConfigDict()
  c.loss.impl = "auto"  # log-prob kernel: auto (pallas on one TPU, else chunked) | reference (full logits) | chunked | pallas

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4  # peak
  c.optim.warmup_steps = 1 if smoke else 10  # optimizer steps
  c.optim.final_lr_fraction = 1.0  # 1.0 = constant after warmup
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # no decay: the base's weights are the prior
  c.optim.clip_grad_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.log_every = 1  # GRPO steps between metric rows
  c.train.checkpoint_every = 3 if smoke else 50  # GRPO steps between checkpoints
  c.train.keep_checkpoints = 2
  c.train.max_consecutive_nonfinite = 5  # NaN/inf updates in a row before stopping
  c.train.progress_bar = True

  c.mesh = c.pretrain.mesh.copy_and_resolve_references()  # the base's mesh

  c.eval = c.pretrain.eval.copy_and_resolve_references()  # same held-out evaluation as the base
  if smoke:
    c.eval.num_problems = 8
  return c

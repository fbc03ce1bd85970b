"""Step 2 of the R1 recipe in the tiny world: R1-Zero (GRPO with rule rewards
straight from the pretrained base).

  python -m r1jax.main --config=configs/r1_zero.py:tiny --workdir=/tmp/r1zero \
      [--config.base_workdir=/tmp/base]

Without `base_workdir` the base is pretrained first into WORKDIR/base with
configs/pretrain.py of the same preset. `smoke` shrinks everything to seconds
(used by the tests).
"""

import importlib.util
import os

import ml_collections


def _pretrain_config(arg: str) -> ml_collections.ConfigDict:
  # configs/ is not a package: load the sibling file by path.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
  spec = importlib.util.spec_from_file_location("r1jax_config_pretrain", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in ("tiny", "smoke"):
    raise ValueError(f"configs/r1_zero.py knows presets 'tiny' and 'smoke', not {arg!r}")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = f"r1_zero-{arg}"
  c.stage = "r1_zero"
  c.seed = 0  # GRPO prompt draws and sampling keys derive from it

  c.base_workdir = ""  # a pretrained base (pretrain stage WORKDIR); "" = pretrain into WORKDIR/base
  c.pretrain = _pretrain_config(arg)  # how the base is (or was) pretrained
  if smoke:  # the smoke base only has to exist, not be good
    c.pretrain.train.num_steps = 10
    c.pretrain.train.checkpoint_every = 10
    c.pretrain.data.batch_size = 8
    c.pretrain.eval.num_problems = 8  # = c.eval below: the eval sampler compiles once
  c.model = c.pretrain.model.to_dict()  # ModelConfig fields; must match the base

  c.grpo = ml_collections.ConfigDict()
  c.grpo.num_steps = 3 if smoke else 200  # rollouts (each followed by updates_per_rollout updates)
  c.grpo.prompts_per_step = 4 if smoke else 16  # B: problems drawn per step (train split)
  c.grpo.levels = (1, 2, 3, 4)  # difficulty levels drawn from, in equal shares
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
  c.grpo.max_new_tokens = 32 if smoke else 128  # completion tokens, stop token included
  c.grpo.stop_pieces = ("</answer>",)  # generation stops after these (and EOS)
  c.grpo.updates_per_rollout = 1  # mu: optimizer steps per rollout batch (1 = exactly on-policy)
  c.grpo.accuracy_weight = 1.0  # reward = accuracy_weight * accuracy + format_weight * format
  c.grpo.format_weight = 0.5
  # Partial credit per well-placed tag: gives a weak base non-zero reward variance
  # (hence a gradient) long before it answers correctly. 0 = off (the R1 recipe).
  c.grpo.tag_count_weight = 0.5 if smoke else 0.0
  c.grpo.reward_workers = 0 if smoke else 2  # reward processes; 0 = inline (no pool start-up)
  c.grpo.reward_timeout_s = 5.0  # per completion and reward function (workers > 0 only)
  c.grpo.log_samples_every = 1 if smoke else 20  # steps between sample tables in samples.jsonl
  c.grpo.num_samples_logged = 8  # completions per sample table

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

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.eval = c.pretrain.eval.copy_and_resolve_references()  # same held-out evaluation as the base
  if smoke:
    c.eval.num_problems = 8
  return c

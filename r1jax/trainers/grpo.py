"""GRPO (design.md §1): a plain loop over jitted pieces.

Per step: draw prompts -> sample G completions with the current params ->
rule rewards -> group advantages -> right-padded train batch -> (reference
forward when beta > 0) -> `updates_per_rollout` optimizer steps on the GRPO loss.

Sections: batch (host side) | step (pure functions) | loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import resource
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.data import curriculum, datasets, jsonl, tinyworld
from r1jax.data.templates import r1_zero_prompt
from r1jax.eval.dynamics import step_dynamics
from r1jax.errors import ConfigError
from r1jax.kernels import impl_from_config, token_logprobs_and_clip
from r1jax.losses.grpo import GRPOLoss, group_advantages
from r1jax.parallel import distributed
from r1jax.parallel.mesh import DEFAULT_RULES, batch_sharding, mesh_rules
from r1jax.rewards import (RewardRunner, accuracy_reward_fn, code_reward_fn, format_reward_fn,
                           tag_count_reward_fn)
from r1jax.sampling.sampler import SamplingConfig, sample
from r1jax.trainers import model_aux, ppo
from r1jax.trainers.metrics import MetricsWriter, plot_curves, truncate_jsonl
from r1jax.trainers.optim import learning_rate_schedule
from r1jax.trainers.sft import NonFiniteError, StopOnSignal, jit_train_step
from r1jax.trainers.state import TrainState, apply_gradients, create_train_state


# ---------------------------------------------------------------------------
# Batch.
# ---------------------------------------------------------------------------

def build_batch(prompts: Sequence[Sequence[int]], group_size: int, tokens_BN: np.ndarray,
                logprobs_BN: np.ndarray, lengths_B: np.ndarray, finished_B: np.ndarray,
                advantages_B: np.ndarray, *, pad_id: int, bucket: int = 32) -> dict[str, np.ndarray]:
  """Right-padded prompt+completion rows; per-token arrays are aligned to targets.

  Row b = prompts[b // G] + tokens_BN[b, :lengths_B[b]]. `targets[:, t]` is
  `tokens[:, t + 1]`; `mask`/`old_logp` are set where the target is a generated
  token (stop token included). T is bucketed so few shapes compile.
  """
  B, N = tokens_BN.shape
  max_len = max(len(p) for p in prompts) + N
  T = -(-(max_len + 1) // bucket) * bucket  # +1: targets are tokens shifted by one
  tokens = np.full((B, T), pad_id, np.int32)
  segment_ids = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T - 1), np.float32)
  old_logp = np.zeros((B, T - 1), np.float32)
  for b in range(B):
    p = np.asarray(prompts[b // group_size], np.int32)
    P, L = len(p), int(lengths_B[b])
    tokens[b, :P] = p
    tokens[b, P:P + L] = tokens_BN[b, :L]
    segment_ids[b, :P + L] = 1
    mask[b, P - 1:P - 1 + L] = 1.0  # logits at P-1 predict the first completion token
    old_logp[b, P - 1:P - 1 + L] = logprobs_BN[b, :L]
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, mask=mask,
              old_logp=old_logp, advantages=np.asarray(advantages_B, np.float32),
              truncated=~np.asarray(finished_B, bool))


# ---------------------------------------------------------------------------
# Step.
# ---------------------------------------------------------------------------

def policy_hidden(params, batch: dict[str, jax.Array], *, model, model_state=None
                  ) -> tuple[jax.Array, jax.Array]:
  """Final normed hidden states at every position but the last, and the output projection.

  `model_state`: the model's non-param collections (MoE router biases), if any."""
  return model_aux.policy_forward(model, params, model_state, batch)[:2]


def policy_logprobs(params, batch: dict[str, jax.Array], *, model, temperature: float,
                    with_entropy: bool = False, impl: str = "auto", model_state=None):
  """log π(target) at every position: logp_B(T-1) under logits / temperature.

  With `with_entropy`, also the entropy of π at every position (the `entropy`
  metric; gradient stopped): returns (logp, entropy). `impl` picks the
  log-prob kernel (r1jax.kernels.IMPLS).
  """
  hidden_BTD, w_DV = policy_hidden(params, batch, model=model, model_state=model_state)
  terms = token_logprobs_and_clip(hidden_BTD, w_DV, batch["tokens"][:, 1:],
                                  temperature=temperature, with_entropy=with_entropy, impl=impl)
  if not with_entropy:
    return terms.logp
  return terms.logp, jax.lax.stop_gradient(terms.entropy)


def _chunk_weights(loss: GRPOLoss, batch: dict[str, jax.Array], micro_batches: int) -> jax.Array:
  """Each micro-batch's share of the whole batch's loss normaliser, so that the
  weighted sum of the micro-batch losses (and gradients) is the batch's: kept
  tokens (token_mean), non-empty sequences (seq_mean_token_mean) or rows."""
  keep_BT = batch["mask"].astype(bool)
  if loss.mask_truncated:
    keep_BT = keep_BT & ~batch["truncated"].astype(bool)[:, None]
  keep_MR = keep_BT.reshape(micro_batches, -1, keep_BT.shape[1]).astype(jnp.float32)
  if loss.loss_aggregation == "token_mean":
    per_M = jnp.sum(keep_MR, axis=(1, 2))
  elif loss.loss_aggregation == "seq_mean_token_mean":
    per_M = jnp.sum(jnp.max(keep_MR, axis=2), axis=1)
  else:
    per_M = jnp.ones((micro_batches,), jnp.float32)
  return per_M / jnp.maximum(jnp.sum(per_M), 1.0)


def grpo_train_step(state: TrainState, batch: dict[str, jax.Array], *, model, loss: GRPOLoss,
                    tx: optax.GradientTransformation, temperature: float, impl: str = "auto",
                    micro_batches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the GRPO loss; skips non-finite updates (as sft.train_step).

  The loss goes from the final hidden states to the per-token terms through the
  `impl` kernel (r1jax.kernels): with `chunked`/`pallas` the logits are never
  materialised. An MoE model adds its balance loss to the objective (`loss`
  stays the GRPO loss) and moves its router biases after the update (model_aux).
  `micro_batches` > 1 accumulates the gradient over that many row chunks in a
  scan (activations of one chunk at a time: G x length never has to fit at
  once); each chunk is weighted by its share of the loss normaliser, so the
  update equals the one-pass update (dense models).
  """

  def loss_fn(params, batch):
    hidden_BTD, w_DV, extras = model_aux.policy_forward(model, params, state.model_state, batch)
    value, metrics = loss.apply({}, hidden_BTD, w_DV, batch["tokens"][:, 1:], batch["old_logp"],
                                batch.get("ref_logp"), batch["advantages"], batch["mask"],
                                batch["truncated"], temperature=temperature, impl=impl,
                                method=GRPOLoss.from_hidden)
    aux, aux_metrics = model_aux.auxiliary_loss(model, extras)
    objective = value if aux is None else value + aux
    return objective, (value, metrics, extras, aux_metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (objective, (value, metrics, extras, aux_metrics)), grads = grad_fn(state.params, batch)
  else:
    if model_aux.state_collections(model):
      raise ValueError("micro_batches > 1 is for dense models: the MoE router statistics "
                       "of the chunks are not combined yet")
    weights_M = _chunk_weights(loss, batch, micro_batches)
    chunks = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)

    def one(chunk):
      (objective, (value, metrics, _, _)), grads = grad_fn(state.params, chunk)
      return objective, value, metrics, grads

    def accumulate(carry, chunk_and_weight):
      chunk, w = chunk_and_weight
      return jax.tree.map(lambda acc, x: acc + w * x, carry, one(chunk)), None

    first = jax.tree.map(lambda x: x[0], chunks)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(one, first))
    (objective, value, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (chunks, weights_M))
    extras, aux_metrics = {}, {}
  new_state, guard = apply_gradients(
      state, grads, objective, tx,
      model_state=model_aux.update_model_state(model, state.model_state, extras))
  metrics = dict(metrics, loss=value, **guard, **aux_metrics,
                 **model_aux.metrics(new_state.model_state, extras))
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=("model", "temperature", "impl"))
def reference_logprobs(ref_params, batch: dict[str, jax.Array], *, model,
                       temperature: float, impl: str = "auto", ref_model_state=None
                       ) -> jax.Array:
  """log π_ref of the batch's targets: the only reference forward (beta > 0 only)."""
  return policy_logprobs(ref_params, batch, model=model, temperature=temperature, impl=impl,
                         model_state=ref_model_state)


def minibatches(batch: dict[str, np.ndarray], num_minibatches: int, group_size: int
                ) -> list[dict[str, np.ndarray]]:
  """Splits a rollout batch row-wise into `num_minibatches` equal parts.

  Whole groups stay together (the split is over prompts), so every mini-batch
  holds complete groups and has the same shape (one compiled update).
  """
  B = batch["tokens"].shape[0]
  num_groups = B // group_size
  if num_minibatches < 1 or num_groups % num_minibatches:
    raise ValueError(f"num_minibatches={num_minibatches} must divide the {num_groups} prompts "
                     "of a step (grpo.prompts_per_step)")
  rows = B // num_minibatches
  return [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
          for i in range(num_minibatches)]


def make_loss(gc: ml_collections.ConfigDict) -> GRPOLoss:
  return GRPOLoss(beta=gc.beta, epsilon_low=gc.epsilon_low, epsilon_high=gc.epsilon_high,
                  loss_aggregation=gc.loss_aggregation, max_completion_length=gc.max_new_tokens,
                  mask_truncated=gc.mask_truncated)


# ---------------------------------------------------------------------------
# Loop.
# ---------------------------------------------------------------------------

def reward_fns(gc: ml_collections.ConfigDict, kind: str = "math") -> dict:
  """name -> (fn, weight): accuracy (code tests for a code task, sandboxed) and
  format, plus tag-count when weighted."""
  if kind == "code":
    fns = {"code": (code_reward_fn, gc.accuracy_weight)}
  else:
    fns = {"accuracy": (accuracy_reward_fn, gc.accuracy_weight)}
  fns["format"] = (format_reward_fn, gc.format_weight)
  if gc.get("tag_count_weight", 0.0):
    fns["tag_count"] = (tag_count_reward_fn, gc.tag_count_weight)
  return fns


def load_task(gc: ml_collections.ConfigDict, tokenizer, max_positions: int) -> list | None:
  """`gc.train_file`'s problems as (problem, prompt ids) pairs, or None (tiny world).

  `train_file` is a .jsonl or .array_record path or `tfds:<name>[:<split>]`
  (read from `gc.data_dir`; r1jax.data.datasets). Malformed lines raise (file:line:field) or are skipped (`gc.on_bad_line`);
  prompts longer than `gc.max_prompt_tokens` (0: what the model's positions
  leave after max_new_tokens) are cut from the left or skipped
  (`gc.overlong_prompts`). Everything dropped is counted in the log.
  """
  path = gc.get("train_file", "")
  if not path:
    return None
  problems, counts = datasets.load_problems(path, data_dir=gc.get("data_dir") or None,
                                            on_error=gc.get("on_bad_line", "raise"))
  limit = gc.get("max_prompt_tokens", 0) or max_positions - gc.max_new_tokens
  ids = jsonl.fit_prompts([tokenizer.encode(r1_zero_prompt(p.question)) for p in problems],
                          limit, gc.get("overlong_prompts", "truncate_left"), counts)
  task = [(p, x) for p, x in zip(problems, ids) if x is not None]
  if not task:
    raise ConfigError(f"grpo.train_file={path} has no usable problems ({dict(counts)})")
  if len({p.kind for p, _ in task}) > 1:
    raise ConfigError(f"grpo.train_file={path} mixes math and code problems; split it")
  logging.warning("task %s: %d problems (%s)", path, len(task),
                  ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
  return task


def step_problems(gc: ml_collections.ConfigDict, seed: int, step: int, task: list | None = None
                  ) -> list:
  """The problems of step `step` without a curriculum: a pure function of (seed, step).

  Tiny world: freshly generated problems. Task file: the step's
  `prompts_per_step` (problem, prompt ids) pairs in an epoch-shuffled order
  (grain; every problem once per epoch; `datasets.StepBatches`).
  """
  return curriculum.Curriculum(curriculum.default_config(),
                               levels=gc.get("levels") or tinyworld.LEVELS,
                               prompts_per_step=gc.prompts_per_step, seed=seed,
                               task=task).draw(step)


@dataclasses.dataclass
class Rollout:
  """Sampled groups: rows are groups x G completions, in group order."""
  problems: list
  texts: list  # prompt texts, one per group
  prompts: list  # prompt ids, one per group
  tokens: np.ndarray  # [rows, N]
  logprobs: np.ndarray  # [rows, N]
  lengths: np.ndarray  # [rows]
  finished: np.ndarray  # [rows]
  completions: list  # decoded, one per row
  total: np.ndarray  # [rows] weighted sum of the rewards
  per_fn: dict  # reward name -> [rows]
  stats: dict  # reward means and error/timeout counts

  def correct_BG(self, G: int) -> np.ndarray:
    """0/1 task accuracy per completion (accuracy or code reward; else the total)."""
    acc = self.per_fn.get("accuracy", self.per_fn.get("code", self.total))
    return np.asarray(acc, np.float32).reshape(-1, G)


def select_groups(rounds: Sequence[Rollout], num_groups: int, G: int) -> tuple[Rollout, dict]:
  """DAPO dynamic sampling: the first `num_groups` groups with unequal
  accuracies across `rounds`, topped up with equal-accuracy groups (zero
  advantage) when the rounds ran out, so the batch keeps its shape.
  Returns the selected rollout and curriculum/* counts."""
  masks, right, wrong = zip(*(curriculum.informative_groups(r.correct_BG(G)) for r in rounds))
  where = [(k, g) for k, mask in enumerate(masks) for g in range(len(mask))]
  informative = [kg for kg in where if masks[kg[0]][kg[1]]]
  chosen = (informative + [kg for kg in where if not masks[kg[0]][kg[1]]])[:num_groups]
  N = max(r.tokens.shape[1] for r in rounds)
  pad = lambda x: np.pad(x, ((0, 0), (0, N - x.shape[1])))
  rows = lambda k, g: slice(g * G, (g + 1) * G)
  pick = lambda f: [x for k, g in chosen for x in f(rounds[k])[rows(k, g)]]
  stack = lambda f: np.concatenate([f(rounds[k])[rows(k, g)] for k, g in chosen])
  stats = {}
  for name in rounds[0].stats:  # counts add up over rounds, means average
    values = [r.stats[name] for r in rounds]
    stats[name] = sum(values) if name.endswith(("errors", "timeouts")) else float(np.mean(values))
  picked = Rollout(
      problems=[rounds[k].problems[g] for k, g in chosen],
      texts=[rounds[k].texts[g] for k, g in chosen],
      prompts=[rounds[k].prompts[g] for k, g in chosen],
      tokens=stack(lambda r: pad(r.tokens)), logprobs=stack(lambda r: pad(r.logprobs)),
      lengths=stack(lambda r: r.lengths), finished=stack(lambda r: r.finished),
      completions=pick(lambda r: r.completions), total=stack(lambda r: r.total),
      per_fn={name: stack(lambda r: r.per_fn[name]) for name in rounds[0].per_fn}, stats=stats)
  counts = {"curriculum/rounds": float(len(rounds)),
            "curriculum/dropped_all_right": float(sum(right)),
            "curriculum/dropped_all_wrong": float(sum(wrong)),
            "curriculum/informative_groups": min(len(informative), num_groups) / num_groups}
  return picked, counts


def _ckpt_tree(state: TrainState, ref_params: Any, ref_model_state: Any = None,
               critic: Any = None) -> dict:
  tree = {"state": state} if ref_params is None else {"state": state, "ref": ref_params}
  if ref_params is not None and ref_model_state:  # the reference's router biases (MoE)
    tree["ref_model_state"] = ref_model_state
  if critic is not None:  # PPO's critic (grpo.algorithm == "ppo")
    tree["critic"] = critic
  return tree


def updates_per_step(gc: ml_collections.ConfigDict) -> int:
  """Optimizer steps per GRPO step: mu epochs over num_minibatches mini-batches."""
  return gc.updates_per_rollout * gc.get("num_minibatches", 1)


def train(config: ml_collections.ConfigDict, workdir: str, *, model, tokenizer, mesh: Mesh,
          tx: optax.GradientTransformation, init_params: Any, rules=DEFAULT_RULES,
          evaluate_fn=None, rewards: dict | None = None,
          init_model_state: Any = None, model_rewards: dict | None = None) -> TrainState:
  """Runs `config.grpo.num_steps` GRPO steps from `init_params`, resuming from
  WORKDIR/checkpoints. Writes metrics.jsonl, samples.jsonl and reward_curve.png.

  `init_model_state` goes with `init_params` for a model that has one (the
  MoE router biases of the base).
  `evaluate_fn(params, model_state) -> dict of floats`, when given, runs every
  `config.grpo.eval_every` steps; its figures are logged as `eval/<name>`.
  `rewards` ({name: (fn, weight)}) replaces the config's reward functions.
  `model_rewards` ({name: (score(prompts, completions) -> [N] floats, weight)})
  are model-based rewards (a trained reward model) scored in this process on
  the trainer's devices, added to the rule rewards; a scorer that raises
  scores 0 for the step and is counted in `rewards/<name>/errors`.
  A reward that raises or times out scores 0 and is counted in
  `rewards/<name>/errors` and `rewards/<name>/timeouts`; training goes on.
  `config.grpo.train_file` (jsonl) replaces the tiny-world problems (`load_task`).
  `config.grpo.curriculum` picks each step's problems (r1jax.data.curriculum:
  levels by stage or adaptively; DAPO dynamic sampling draws more rounds of
  prompts until the groups carry a learning signal). `config.grpo.algorithm`
  = "ppo" trains with a critic and GAE instead of group advantages
  (r1jax.trainers.ppo), on the same rollouts.

  Pre-emption: a restart with the same arguments resumes from the last
  complete checkpoint and reproduces the uninterrupted run (prompts, keys and
  reference refreshes are functions of the step; metrics/sample rows written
  after that checkpoint are dropped and written again). SIGTERM saves a
  checkpoint after the current step and exits 143.
  Non-finite loss/gradients: the update is skipped, logged with its step,
  mini-batch and problem ids and counted in `skipped_updates`; more than
  `train.max_consecutive_nonfinite` in a row raise NonFiniteError.
  """
  gc, tc = config.grpo, config.train
  G, mu = gc.num_generations, gc.updates_per_rollout
  algorithm = ppo.check_config(gc)
  task = load_task(gc, tokenizer, model.config.max_position_embeddings)  # bad input fails first
  num_mb = gc.get("num_minibatches", 1)
  mu_total = updates_per_step(gc)
  num_updates = gc.num_steps * mu_total
  state, shardings = create_train_state(model, tx, mesh, config.seed, init_params, rules,
                                        init_model_state=init_model_state)
  # The reference policy: the initial params, refreshed every ref_refresh_every
  # steps. Not held at all when beta == 0 (no KL term, no reference forward).
  use_ref = gc.beta > 0
  ref_params = jax.tree.map(jnp.copy, init_params) if use_ref else None
  ref_model_state = jax.tree.map(jnp.copy, state.model_state) if use_ref else None
  impl = impl_from_config(config)
  cc = gc.get("curriculum") or curriculum.default_config()
  cur = curriculum.Curriculum(cc, levels=gc.levels, prompts_per_step=gc.prompts_per_step,
                              seed=config.seed, task=task)
  critic = None
  if algorithm == "ppo":  # a second model: the critic (r1jax.trainers.ppo)
    critic = ppo.Critic(config, model=model, mesh=mesh, tx=tx, init_params=init_params,
                        init_model_state=init_model_state, policy_shardings=shardings,
                        num_updates=num_updates, impl=impl, rules=rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  start = 0
  if ckpt.latest_step() is not None:
    tree, meta = ckpt.restore(abstract_like(
        _ckpt_tree(state, ref_params, ref_model_state, critic and critic.state)))
    state, ref_params = tree["state"], tree.get("ref")
    ref_model_state = tree.get("ref_model_state", ref_model_state)
    if critic is not None:
      critic.state = tree["critic"]
    if "curriculum" in meta:
      cur.load_state_dict(meta["curriculum"])
    start = int(meta["grpo_step"])
    if int(state.step) != start * mu_total:
      raise RuntimeError(f"checkpoint metadata {meta} disagrees with state step {int(state.step)}")

  loss = make_loss(gc)
  step_fn = functools.partial(grpo_train_step, model=model, loss=loss, tx=tx,
                              micro_batches=gc.get("micro_batches", 1),
                              temperature=gc.temperature, impl=impl)
  stop_ids = tuple(tokenizer.piece_to_id(s) for s in gc.stop_pieces)
  sc = SamplingConfig(max_new_tokens=gc.max_new_tokens, temperature=gc.temperature,
                      top_p=gc.top_p, top_k=gc.top_k, num_samples=G, stop_token_ids=stop_ids,
                      decode_segments=gc.get("decode_segments", SamplingConfig.decode_segments))
  kind = task[0][0].kind if task else "math"
  rewards = RewardRunner(rewards or reward_fns(gc, kind), timeout_s=gc.reward_timeout_s,
                         workers=gc.reward_workers)
  lr_at = learning_rate_schedule(config.optim, num_updates)
  # Rows a killed run wrote after its last checkpoint are written again below.
  writer = MetricsWriter(workdir, resume_step=start)
  samples_path = os.path.join(workdir, "samples.jsonl")
  if writer.enabled:
    truncate_jsonl(samples_path, start)

  def rollout(state: TrainState, step: int, round_: int, key: jax.Array) -> Rollout:
    """Round `round_` of step `step`: draw, sample G completions each, score."""
    drawn = cur.draw(step, round_)
    problems = [p for p, _ in drawn] if task else drawn
    texts = [r1_zero_prompt(p.question) for p in problems]
    prompts = [ids for _, ids in drawn] if task else [tokenizer.encode(t) for t in texts]
    # The sampler runs on the trainer's sharded params; every host gets every
    # completion back, scores its share and all-gathers the rewards.
    out = distributed.fetch(sample(model, state.params, prompts,
                                   jax.random.fold_in(key, round_) if round_ else key, sc,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                   model_state=state.model_state))
    lengths = np.asarray(out.lengths)
    completions = [tokenizer.decode(t[:n].tolist()) for t, n in zip(out.tokens, lengths)]
    row_texts = [t for t in texts for _ in range(G)]
    total_N, per_fn, reward_stats = distributed.score_on_hosts(
        rewards, row_texts, completions, [p.answer for p in problems for _ in range(G)])
    for name, (score_fn, weight) in (model_rewards or {}).items():
      try:
        values = np.asarray(score_fn(row_texts, completions), np.float32)
        errors = 0
      except Exception:  # pylint: disable=broad-except  (a reward never stops training)
        logging.exception("GRPO step %d: model reward %s failed; it scores 0", step + 1, name)
        values, errors = np.zeros(len(completions), np.float32), len(completions)
      total_N = total_N + np.float32(weight) * values
      reward_stats.update({f"rewards/{name}/mean": float(values.mean()),
                           f"rewards/{name}/errors": errors, f"rewards/{name}/timeouts": 0})
    return Rollout(problems, texts, prompts, np.asarray(out.tokens), np.asarray(out.logprobs),
                   lengths, np.asarray(out.finished), completions, total_N, per_fn, reward_stats)

  with mesh_rules(mesh, rules):
    jitted = jit_train_step(step_fn, shardings, mesh)
    stop = StopOnSignal()
    bar = tqdm(range(start, gc.num_steps), initial=start, total=gc.num_steps,
               desc=config.get("name", "grpo"), dynamic_ncols=True,
               disable=not tc.get("progress_bar", True) or start >= gc.num_steps
               or not writer.enabled)
    try:
      for step in bar:
        if use_ref and gc.ref_refresh_every and step > 0 and step % gc.ref_refresh_every == 0:
          ref_params = jax.tree.map(jnp.copy, state.params)
          ref_model_state = jax.tree.map(jnp.copy, state.model_state)
        # Keys are folded by step, so a resumed run samples what it would have.
        sample_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)

        # Rollout: round 0, and with dynamic sampling more rounds of prompts
        # until prompts_per_step groups carry a learning signal.
        t0 = time.perf_counter()
        rounds = [rollout(state, step, 0, sample_key)]
        while cc.dynamic_sampling and len(rounds) < cc.max_rounds and sum(
            curriculum.informative_groups(r.correct_BG(G))[0].sum() for r in rounds
        ) < gc.prompts_per_step:
          rounds.append(rollout(state, step, len(rounds), sample_key))
        t_sample = time.perf_counter() - t0
        cur.observe(step, [p.level for r in rounds for p in r.problems],
                    np.concatenate([r.correct_BG(G) for r in rounds]))
        if cc.dynamic_sampling:
          roll, curriculum_metrics = select_groups(rounds, gc.prompts_per_step, G)
        else:
          roll, curriculum_metrics = rounds[0], {}
        curriculum_metrics.update(cur.metrics())
        problems, prompts, completions = roll.problems, roll.prompts, roll.completions
        total_N, per_fn, reward_stats, lengths = roll.total, roll.per_fn, roll.stats, roll.lengths
        rewards_BG = total_N.reshape(len(problems), G)
        advantages = np.asarray(group_advantages(jnp.asarray(rewards_BG),
                                                 scale_by_std=gc.scale_rewards)).reshape(-1)

        # Update.
        host = build_batch(prompts, G, roll.tokens, roll.logprobs, lengths, roll.finished,
                           advantages, pad_id=tokenizer.pad_id)
        if critic is not None:
          host["rewards"] = total_N.astype(np.float32)
        # Old log-probs are the sampler's (taken at sampling time), so with
        # mu > 1 or several mini-batches the later updates are off-policy and
        # the ratio moves away from 1 where clipping acts.
        t0 = time.perf_counter()
        parts = [distributed.shard_batch(mb, batch_sharding(mesh))  # each host feeds its rows
                 for mb in minibatches(host, num_mb, G)]
        if use_ref:
          for mb in parts:
            mb["ref_logp"] = reference_logprobs(ref_params, mb, model=model,
                                                temperature=gc.temperature, impl=impl,
                                                ref_model_state=ref_model_state)
        if critic is not None:  # PPO: per-token advantages from the critic (GAE)
          parts = [critic.prepare(mb) for mb in parts]
        step_metrics = []
        for _ in range(mu):
          for mb in parts:
            state, metrics = jitted(state, mb) if critic is None else critic.step(state, mb)
            step_metrics.append(metrics)
        step_metrics = jax.device_get(step_metrics)
        m = {k: float(np.mean([x[k] for x in step_metrics])) for k in step_metrics[0]}
        t_train = time.perf_counter() - t0

        done = step + 1
        skipped = [u for u, x in enumerate(step_metrics) if int(x["nonfinite"])]
        per_mb = len(problems) // num_mb
        for u in skipped:  # update u = epoch * num_mb + mini-batch
          epoch, mb = divmod(u, num_mb)
          logging.warning("GRPO step %d: non-finite loss or gradient in update %d (epoch %d, "
                          "mini-batch %d, problems %s): update skipped", done, u, epoch, mb,
                          ",".join(p.uid for p in problems[mb * per_mb:(mb + 1) * per_mb]))
        run = int(state.nonfinite_run)
        if run > tc.max_consecutive_nonfinite:
          raise NonFiniteError(f"{run} consecutive non-finite updates ending at GRPO step {done} "
                               f"(train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite})")
        group_std = rewards_BG.std(axis=1)
        if (group_std == 0).all():  # no learning signal this step: normal early on, not an error
          logging.info("GRPO step %d: every group's rewards are equal (mean %.3f); advantages "
                       "are 0", done, float(rewards_BG.mean()))
        m.update({
            "reward": float(rewards_BG.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std == 0).mean()),
            "skipped_updates": float(len(skipped)),
            **reward_stats,
            **curriculum_metrics,
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(host["truncated"].mean()),
            # Self-evolution (issue 11): length percentiles, reflections, per-level figures.
            **step_dynamics(completions, lengths,
                            levels=[getattr(p, "level", 0) for p in problems for _ in range(G)],
                            correct=per_fn.get("accuracy"),
                            markers=gc.get("reflection_markers") or None),
            "sampling_tokens_per_sec": float(lengths.sum()) / max(t_sample, 1e-9),
            "train_tokens_per_sec": float(host["segment_ids"].sum()) * mu / max(t_train, 1e-9),
            "learning_rate": float(lr_at(done * mu_total - 1)),
            "time/sampling_s": t_sample,
            "time/training_s": t_train,
            # What the run holds (policy, Adam, reference, critic) and the process's peak RSS.
            "memory/state_mib": ppo.tree_bytes(
                _ckpt_tree(state, ref_params, ref_model_state, critic and critic.state)) / 2**20,
            "memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
        eval_every = gc.get("eval_every", 0)
        if evaluate_fn is not None and eval_every and done % eval_every == 0 and done < gc.num_steps:
          m.update({f"eval/{k}": float(v)
                    for k, v in evaluate_fn(state.params, state.model_state).items()})
        if done % tc.log_every == 0 or done == gc.num_steps:
          writer.write(done, m)
        bar.set_postfix(reward=f"{m['reward']:.3f}", len=f"{m['completions/mean_length']:.0f}")
        if writer.enabled and gc.log_samples_every and (done % gc.log_samples_every == 0
                                                        or done == 1):
          with open(samples_path, "a") as f:
            for i in range(min(gc.num_samples_logged, len(completions))):
              f.write(json.dumps(dict(step=done, prompt=problems[i // G].question,
                                      gold=problems[i // G].answer, completion=completions[i],
                                      reward=float(total_N[i]))) + "\n")
        ckpt.save(done, _ckpt_tree(state, ref_params, ref_model_state, critic and critic.state),
                  {"grpo_step": done, "curriculum": cur.state_dict()},
                  force=stop.requested or done == gc.num_steps)
        if stop.requested:
          bar.write(f"stop signal received: saved step {done}, exiting")
          break
    finally:
      stop.restore()
      rewards.close()
      ckpt.close()
      writer.close()
  if writer.enabled:
    plot_curves(writer.path, ["reward", "rewards/accuracy/mean", "completions/mean_length",
                              "reflection/rate"],
                os.path.join(workdir, "reward_curve.png"), title=config.get("name", ""))
  if stop.requested:
    raise SystemExit(143)
  return state

"""Reward-model training on preference pairs (R1 stage 4): a plain loop over a
jitted Bradley–Terry step, and the scorer GRPO calls.

Pairs come from jsonl, one object per line: {"prompt", "chosen", "rejected"}
(`load_pairs` names file:line and field on bad input). Sections: data | step |
loop | scoring.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.data.jsonl import read_string_rows
from r1jax.losses.reward_model import BradleyTerryLoss
from r1jax.parallel.mesh import DEFAULT_RULES, batch_sharding, mesh_rules
from r1jax.trainers.metrics import MetricsWriter, plot_curves
from r1jax.trainers.sft import StopOnSignal
from r1jax.trainers.state import TrainState, apply_gradients, create_train_state


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: str
  chosen: str
  rejected: str


def load_pairs(path: str) -> list[Pair]:
  """Preference pairs of a jsonl file; ValueError naming file:line and field."""
  pairs = [Pair(r["prompt"], r["chosen"], r["rejected"])
           for r in read_string_rows(path, ("prompt", "chosen", "rejected"))]
  if not pairs:
    raise ValueError(f"{path}: no preference pairs")
  return pairs


def write_pairs(path: str, pairs: Sequence[Pair]):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for p in pairs:
      f.write(json.dumps(dataclasses.asdict(p)) + "\n")
  os.replace(path + ".tmp", path)


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded [N, max_len] token ids (BOS + text, cut from the left to fit) and
  the index of each row's last token."""
  rows = [[tokenizer.bos_id, *tokenizer.encode(t)][-max_len:] for t in texts]
  tokens = np.full((len(rows), max_len), pad_id, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return tokens, np.array([len(r) - 1 for r in rows], np.int32)


def pair_arrays(tokenizer, pairs: Sequence[Pair], max_len: int) -> dict[str, np.ndarray]:
  """chosen/rejected tokens and last indices, pair-major."""
  c, ci = encode_texts(tokenizer, [p.prompt + p.chosen for p in pairs], max_len,
                       tokenizer.pad_id)
  r, ri = encode_texts(tokenizer, [p.prompt + p.rejected for p in pairs], max_len,
                       tokenizer.pad_id)
  return {"chosen": c, "chosen_last": ci, "rejected": r, "rejected_last": ri}


# ---------------------------------------------------------------------------
# Step.
# ---------------------------------------------------------------------------

def _scores(model, params, tokens_BT, last_B):
  return model.apply({"params": params}, tokens_BT, last_index_B=last_B)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               tx: optax.GradientTransformation, loss: BradleyTerryLoss
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Bradley–Terry step on a batch of pairs (chosen and rejected in one forward)."""
  B = batch["chosen"].shape[0]

  def loss_fn(params):
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    last = jnp.concatenate([batch["chosen_last"], batch["rejected_last"]])
    s = _scores(model, params, tokens, last)
    return loss.apply({}, s[:B], s[B:])

  (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, guard = apply_gradients(state, grads, value, tx)
  return new_state, dict(loss=value, **metrics, **guard)


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_scores(model, params, tokens_BT, last_B):
  return _scores(model, params, tokens_BT, last_B)


def pair_accuracy(model, params, arrays: dict[str, np.ndarray], batch_size: int = 64) -> float:
  """Share of pairs whose chosen answer scores above the rejected one."""
  wins = []
  for i in range(0, len(arrays["chosen"]), batch_size):
    sl = slice(i, i + batch_size)
    c = _eval_scores(model, params, arrays["chosen"][sl], arrays["chosen_last"][sl])
    r = _eval_scores(model, params, arrays["rejected"][sl], arrays["rejected_last"][sl])
    wins.append(np.asarray(c > r))
  return float(np.concatenate(wins).mean())


# ---------------------------------------------------------------------------
# Loop.
# ---------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str, *, model, tokenizer,
          pairs: Sequence[Pair], mesh: Mesh, tx: optax.GradientTransformation,
          init_params: Any = None, rules=DEFAULT_RULES) -> TrainState:
  """`config.train.num_steps` Bradley–Terry steps over `pairs` (batch
  `config.rm.batch_size`, a fresh seeded order per epoch), resuming from
  WORKDIR/checkpoints; metrics (loss, accuracy, margin) to WORKDIR/metrics.jsonl."""
  tc, rc = config.train, config.rm
  arrays = pair_arrays(tokenizer, pairs, rc.max_length)
  n, B = len(pairs), rc.batch_size
  if n < B:
    raise ValueError(f"{n} preference pairs for rm.batch_size={B}")
  if init_params is not None:  # the step donates its state: keep the caller's arrays alive
    init_params = jax.tree.map(jnp.copy, init_params)
  state, shardings = create_train_state(model, tx, mesh, config.seed, init_params, rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(abstract_like(state))
  start = int(state.step)
  loss = BradleyTerryLoss(margin=rc.get("margin", 0.0), center_weight=rc.get("center_weight", 0.0))
  step_fn = functools.partial(train_step, model=model, tx=tx, loss=loss)
  per_epoch = n // B
  with mesh_rules(mesh, rules):
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    writer = MetricsWriter(workdir, resume_step=start)
    stop = StopOnSignal()
    bar = tqdm(range(start, tc.num_steps), initial=start, total=tc.num_steps,
               desc=config.get("name", "reward-model"), dynamic_ncols=True,
               disable=not tc.get("progress_bar", True) or start >= tc.num_steps)
    for step in bar:
      epoch, offset = divmod(step, per_epoch)
      rows = np.random.default_rng([config.seed, epoch]).permutation(n)[offset * B:(offset + 1) * B]
      batch = jax.device_put({k: v[rows] for k, v in arrays.items()}, batch_sharding(mesh))
      state, metrics = jitted(state, batch)
      done = step + 1
      if done % tc.log_every == 0 or done == tc.num_steps:
        m = jax.device_get(metrics)
        writer.write(done, m)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
      ckpt.save(done, state, {"data_index": done}, force=stop.requested or done == tc.num_steps)
      if stop.requested:
        break
    stop.restore()
    ckpt.close()
    writer.close()
  plot_curves(writer.path, ["loss", "accuracy"], os.path.join(workdir, "loss_curve.png"),
              title=config.get("name", ""))
  if stop.requested:
    raise SystemExit(143)
  return state


# ---------------------------------------------------------------------------
# Scoring (the model-based reward inside GRPO).
# ---------------------------------------------------------------------------

class RewardModelScorer:
  """Scores (prompt, text) pairs with a trained reward model, in batches, on the
  trainer's devices. `score(prompts, texts)` -> float32 [N]."""

  def __init__(self, model, params, tokenizer, *, max_length: int, batch_size: int = 64):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_length, self.batch_size = max_length, batch_size

  def score(self, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    tokens, last = encode_texts(self.tokenizer, [p + t for p, t in zip(prompts, texts)],
                                self.max_length, self.tokenizer.pad_id)
    out = []
    for i in range(0, len(tokens), self.batch_size):
      sl = slice(i, i + self.batch_size)
      n = len(tokens[sl])
      pad = self.batch_size - n  # one compiled shape
      t = np.pad(tokens[sl], ((0, pad), (0, 0)), constant_values=self.tokenizer.pad_id)
      l = np.pad(last[sl], (0, pad))
      out.append(np.asarray(_eval_scores(self.model, self.params, t, l))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

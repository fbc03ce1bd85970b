"""Supervised next-token training (pretraining and SFT): a plain loop over a
jitted step.

Sections: step (pure function) | loop (resume, log, checkpoint).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from r1jax.checkpoint.manager import Checkpointer, abstract_like
from r1jax.errors import ConfigError
from r1jax.kernels import impl_from_config
from r1jax.losses.sft import hidden_cross_entropy
from r1jax.models.transformer import output_weights_DV
from r1jax.parallel.distributed import shard_batch
from r1jax.parallel.mesh import DEFAULT_RULES, batch_sharding, mesh_rules
from r1jax.trainers import model_aux
from r1jax.trainers.metrics import MetricsWriter, plot_curves
from r1jax.trainers.optim import learning_rate_schedule
from r1jax.trainers.state import TrainState, apply_gradients, create_train_state


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps produced NaN/inf loss or gradients."""


# ---------------------------------------------------------------------------
# Step.
# ---------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict[str, jax.Array], *, model,
               tx: optax.GradientTransformation, impl: str = "auto"
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on masked next-token loss; skips non-finite updates.

  `impl` picks the log-prob kernel (r1jax.kernels.IMPLS) that takes the final
  hidden states to the loss. An MoE model adds its balance and MTP losses to
  the objective (`loss` stays the next-token loss) and, after the optimizer
  step, moves its router biases towards balance (model_aux).
  """

  def loss_fn(params):
    hidden_BTD, extras = model_aux.forward(model, params, state.model_state, batch, mtp=True)
    w_DV = output_weights_DV(model.config, params).astype(model.config.dtype)
    loss, num_tokens = hidden_cross_entropy(hidden_BTD, w_DV, batch["targets"],
                                            batch["loss_weights"], impl=impl)
    aux, aux_metrics = model_aux.auxiliary_loss(model, extras, w_DV=w_DV, batch=batch, impl=impl)
    objective = loss if aux is None else loss + aux
    return objective, (loss, num_tokens, extras, aux_metrics)

  (objective, (loss, num_tokens, extras, aux_metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state, guard = apply_gradients(
      state, grads, objective, tx,
      model_state=model_aux.update_model_state(model, state.model_state, extras))
  metrics = dict(loss=loss, num_tokens=num_tokens, **guard, **aux_metrics,
                 **model_aux.metrics(new_state.model_state, extras))
  return new_state, metrics


@functools.lru_cache(maxsize=None)
def update_compiler_options() -> tuple:
  """XLA options for jitted updates on this backend, as (name, value) pairs.

  On CPU, YNNPACK's library fusions are switched off for updates. In a profile
  of benchmarks/grpo_step.py's bench update they ran the attention backward's
  batched [448, 64] x [64, 224] products at ~16 GFLOP/s; without them the
  update took 7.1-7.9 s instead of 7.6-8.9 s (4 steps in each of two
  alternating runs), and the tiny SFT step was unchanged. The sampler's
  decode loop keeps them: it ran 1.5x slower without. An XLA that no longer
  has the option gets none.
  """
  if jax.default_backend() != "cpu":
    return ()
  options = {"xla_cpu_experimental_ynn_fusion_type": ""}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros((), jnp.float32))
  except jax.errors.JaxRuntimeError:
    return ()
  return tuple(options.items())


def jit_train_step(step_fn: Callable, state_shardings, mesh: Mesh, arg_shardings: tuple = ()):
  """Jits `step_fn(state, batch, *args)` once with explicit shardings and state
  donation; `arg_shardings` are those of the extra arguments (e.g. a teacher's params)."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding(mesh), *arg_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,),
                 compiler_options=dict(update_compiler_options()) or None)


# ---------------------------------------------------------------------------
# Loop.
# ---------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str, *, model, dataset, mesh: Mesh,
          tx: optax.GradientTransformation, init_params: Any = None,
          rules=DEFAULT_RULES, init_model_state: Any = None, step_fn: Callable | None = None,
          step_args: tuple = ()) -> TrainState:
  """Runs `config.train.num_steps` steps, resuming from WORKDIR/checkpoints.

  `dataset.batch(i)` must be a pure function of i (the data position is the step).
  `init_model_state` goes with `init_params` for a model that has one (MoE).
  `step_fn(state, batch, *step_args)` replaces the next-token step (e.g.
  token-level distillation, r1jax.trainers.distill, with the teacher's params
  as `step_args`: jit arguments in their own shardings, never constants).
  """
  tc = config.train
  if getattr(getattr(model, "config", None), "attention_impl", "xla") == "cudnn":
    raise ConfigError("model.attention_impl='cudnn' is causal attention without the segment "
                      "mask: exact only for rows holding one sequence each, and SFT rows are "
                      "packed. Use 'xla' for SFT (cudnn is for GRPO updates).")
  state, shardings = create_train_state(model, tx, mesh, config.seed, init_params, rules,
                                        init_model_state=init_model_state)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(state))
    if meta.get("data_index") != int(state.step):
      raise RuntimeError(f"checkpoint metadata {meta} disagrees with state step {int(state.step)}")
  start = int(state.step)

  step_fn = step_fn or functools.partial(train_step, model=model, tx=tx,
                                         impl=impl_from_config(config))
  with mesh_rules(mesh, rules):
    jitted = jit_train_step(step_fn, shardings, mesh,
                            jax.tree.map(lambda x: x.sharding, step_args))
    writer = MetricsWriter(workdir, resume_step=start)
    stop = StopOnSignal()
    bar = tqdm(range(start, tc.num_steps), initial=start, total=tc.num_steps,
               desc=config.get("name", "train"), dynamic_ncols=True,
               disable=not tc.get("progress_bar", True) or start >= tc.num_steps
               or not writer.enabled)
    lr_at = learning_rate_schedule(config.optim, tc.num_steps)
    window_tokens, window_start = 0.0, time.perf_counter()
    for step in bar:
      host_batch = dataset.batch(step)
      window_tokens += float(host_batch["loss_weights"].sum())
      batch = shard_batch(host_batch, batch_sharding(mesh))  # each host feeds its own rows
      state, metrics = jitted(state, batch, *step_args)
      done = step + 1
      if done % tc.log_every == 0 or done == tc.num_steps:
        m = jax.device_get(metrics)
        run = int(state.nonfinite_run)
        if run > tc.max_consecutive_nonfinite:
          raise NonFiniteError(f"{run} consecutive non-finite steps ending at step {done}")
        elapsed = time.perf_counter() - window_start
        m.update(tokens_per_sec=window_tokens / max(elapsed, 1e-9),
                 learning_rate=float(lr_at(done - 1)))
        writer.write(done, m)
        bar.set_postfix(loss=f"{m['loss']:.3f}", gnorm=f"{m['grad_norm']:.2f}")
        window_tokens, window_start = 0.0, time.perf_counter()
      ckpt.save(done, state, {"data_index": done}, force=stop.requested or done == tc.num_steps)
      if stop.requested:
        bar.write(f"stop signal received: saved step {done}, exiting")
        break
    stop.restore()
    ckpt.close()
    writer.close()
  if writer.enabled:
    plot_curves(writer.path, ["loss", "grad_norm"], os.path.join(workdir, "loss_curve.png"),
                title=config.get("name", ""))
  if stop.requested:
    raise SystemExit(143)
  return state


class StopOnSignal:
  """SIGTERM (pre-emption) sets a flag so the loop saves and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)

"""The train state pytree and its sharded creation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from r1jax.parallel.mesh import DEFAULT_RULES, logical_shardings, replicated, sharded_init


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (= step)."""

  step: jax.Array  # int32: optimizer steps taken (= batches consumed)
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; per-step keys are fold_in(rng, step)
  nonfinite_run: jax.Array  # int32: consecutive steps skipped for NaN/inf
  # The model's non-param collections, e.g. {"moe_state": router biases}: part
  # of the model, changed by the train step outside the optimizer; {} for the
  # dense model.
  model_state: Any = flax.struct.field(default_factory=dict)


def state_collections(model) -> tuple[str, ...]:
  """The model's persistent non-param collections (DeepseekV3: ("moe_state",))."""
  return tuple(getattr(model, "STATE_COLLECTIONS", ()))


def _init_variables(model, key) -> dict:
  """params and the persistent collections of a freshly initialised model."""
  variables = model.init(key, jnp.zeros((1, 8), jnp.int32))
  return {k: v for k, v in variables.items() if k == "params" or k in state_collections(model)}


def create_train_state(model, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                       init_params: Any = None, rules=DEFAULT_RULES,
                       init_model_state: Any = None):
  """Builds a sharded TrainState; returns (state, state shardings).

  `init_params` (already sharded) replaces random init, e.g. to fine-tune a base;
  a model with state collections (MoE router biases) then needs the base's
  `init_model_state` too.
  """
  init_key, state_key = jax.random.split(jax.random.key(seed))
  rep = replicated(mesh)
  model_state = {}
  if init_params is None and state_collections(model):
    variables, _ = sharded_init(lambda: _init_variables(model, init_key), mesh, rules)
    params = variables.pop("params")
    model_state = variables
  elif init_params is None:
    dummy = jnp.zeros((1, 8), jnp.int32)
    params, _ = sharded_init(lambda: model.init(init_key, dummy)["params"], mesh, rules)
  else:
    params = init_params
    if state_collections(model):
      if init_model_state is None:
        raise ValueError(f"{type(model).__name__} keeps {state_collections(model)} besides its "
                         "params: pass the base's init_model_state with init_params")
      model_state = jax.device_put(init_model_state, rep)
  # Moments are created in their params' shardings (ZeRO: sharded like the
  # params); scalars (Adam's count) replicated on the mesh. Explicit out
  # shardings: left to XLA, moments came out replicated, and on one device the
  # count landed off the mesh, so the train step compiled twice.
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: rep)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
      rng=jax.device_put(jax.random.key_data(state_key), rep),
      nonfinite_run=jax.device_put(jnp.zeros((), jnp.int32), rep), model_state=model_state)
  return state, jax.tree.map(lambda x: x.sharding, state)


def abstract_train_state(model, tx: optax.GradientTransformation, mesh: Mesh,
                         rules=DEFAULT_RULES, notes: list | None = None) -> TrainState:
  """The TrainState as sharded ShapeDtypeStructs: nothing is allocated.

  For models too large for the host (dry runs, `jit(...).lower` checks of the
  real presets): same shapes and shardings `create_train_state` would build.
  `notes` collects the params whose dimensions do not divide their mesh axes.
  """
  variables = jax.eval_shape(lambda: _init_variables(model, jax.random.key(0)))
  boxed = variables.pop("params")
  shardings = nn.unbox(logical_shardings(boxed, mesh, rules, notes))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  rep = replicated(mesh)
  model_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                             nn.unbox(variables))
  opt_state = optax.tree_map_params(
      tx, lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, params), shardings,
      transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep))
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
  return TrainState(step=scalar(jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                    nonfinite_run=scalar(jnp.int32), model_state=model_state)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation, model_state: Any = None
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; a NaN/inf loss or gradient leaves params and moments
  untouched and counts towards `nonfinite_run`. Returns (state, guard metrics).

  `model_state`, when given, replaces state.model_state on a finite step (the
  MoE router-bias update happens outside the optimizer)."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
      model_state=(state.model_state if model_state is None
                   else keep(model_state, state.model_state)))
  return new_state, dict(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))

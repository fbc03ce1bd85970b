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


def create_train_state(model, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
                       init_params: Any = None, rules=DEFAULT_RULES):
  """Builds a sharded TrainState; returns (state, state shardings).

  `init_params` (already sharded) replaces random init, e.g. to fine-tune a base.
  """
  init_key, state_key = jax.random.split(jax.random.key(seed))
  if init_params is None:
    dummy = jnp.zeros((1, 8), jnp.int32)
    params, _ = sharded_init(lambda: model.init(init_key, dummy)["params"], mesh, rules)
  else:
    params = init_params
  rep = replicated(mesh)
  # Moments follow their params' shardings; scalars (Adam's count) would land
  # on one device, so anything not spread over the mesh is replicated on it.
  opt_state = jax.tree.map(
      lambda x: x if x.sharding.device_set == set(mesh.devices.flat) else jax.device_put(x, rep),
      jax.jit(tx.init)(params))
  state = TrainState(
      step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
      rng=jax.device_put(jax.random.key_data(state_key), rep),
      nonfinite_run=jax.device_put(jnp.zeros((), jnp.int32), rep))
  return state, jax.tree.map(lambda x: x.sharding, state)


def abstract_train_state(model, tx: optax.GradientTransformation, mesh: Mesh,
                         rules=DEFAULT_RULES) -> TrainState:
  """The TrainState as sharded ShapeDtypeStructs: nothing is allocated.

  For models too large for the host (dry runs, `jit(...).lower` checks of the
  real presets): same shapes and shardings `create_train_state` would build.
  """
  dummy = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
  shardings = nn.unbox(logical_shardings(boxed, mesh, rules))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(boxed), shardings)
  rep = replicated(mesh)
  spread = lambda x: x.sharding is not None and len(x.sharding.device_set) == mesh.size
  opt_state = jax.tree.map(
      lambda x: x if spread(x) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      jax.eval_shape(tx.init, params))
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
  return TrainState(step=scalar(jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                    nonfinite_run=scalar(jnp.int32))


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; a NaN/inf loss or gradient leaves params and moments
  untouched and counts towards `nonfinite_run`. Returns (state, guard metrics)."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
  return new_state, dict(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))

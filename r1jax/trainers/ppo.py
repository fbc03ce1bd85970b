"""PPO as a switch on the GRPO trainer (`grpo.algorithm = "ppo"`): the
baseline GRPO replaces (DeepSeekMath §4.1), on the same rollouts, rewards and
loop, so the two compare at equal samples.

The critic is a second copy of the base with a zero-initialised per-token
value head (`ValueHead`), with its own TrainState and AdamW (`ppo.*`). Per
rollout mini-batch: token rewards (each completion's rule reward on its last
token, minus beta (log π_old - log π_ref) per token when grpo.beta > 0), the
critic's values, GAE (γ, λ) and per-mini-batch whitened advantages
(`prepare`); then one step of the clipped policy + value objective
(r1jax.losses.ppo.PPOLoss) moves the policy and the critic together
(`ppo_train_step`). What GRPO saves is visible here: the critic's params,
moments and forward/backward.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from r1jax.errors import ConfigError
from r1jax.kernels import token_logprobs_and_clip
from r1jax.losses.ppo import PPOLoss, gae, whiten
from r1jax.models.reward_model import ValueHead
from r1jax.parallel.mesh import DEFAULT_RULES, batch_sharding, replicated
from r1jax.trainers import model_aux
from r1jax.trainers.optim import make_optimizer
from r1jax.trainers.state import TrainState, apply_gradients, create_train_state

ALGORITHMS = ("grpo", "ppo")


def default_config() -> ml_collections.ConfigDict:
  """`config.ppo`: used when grpo.algorithm == "ppo"."""
  c = ml_collections.ConfigDict()
  c.gamma = 1.0  # discount over completion tokens
  # GAE lambda. 1 = every token's advantage is R - V(s_t). With one reward at
  # the end and a fresh critic, lambda < 1 shrinks the credit reaching the early,
  # decisive tokens by lambda^(tokens to go) (0.95^50 = 0.08): in the tiny
  # world PPO at 0.95 learned the format and lost accuracy
  # (experiments/r1_zero_dynamics). VAPO (2025) keeps 1 for the same reason.
  c.lam = 1.0
  c.epsilon = 0.2  # policy ratio clip
  c.value_clip = 0.2  # value clip around the rollout's values
  c.vf_coef = 0.1  # value-loss weight in the logged objective (separate optimizers: Adam makes it a scale only)
  c.whiten_advantages = True  # normalise advantages over each mini-batch's tokens
  c.critic_learning_rate = 0.0  # peak; 0 = optim.learning_rate
  return c


def check_config(gc: ml_collections.ConfigDict) -> str:
  algorithm = gc.get("algorithm", "grpo")
  if algorithm not in ALGORITHMS:
    raise ConfigError(f"grpo.algorithm={algorithm!r}: expected one of {ALGORITHMS}")
  return algorithm


def critic_values(critic_params, batch: dict[str, jax.Array], *, model, model_state=None
                  ) -> jax.Array:
  """V at every position but the last, [B, T-1]: the value of the prefix that
  predicts target t (aligned with batch["mask"])."""
  hidden_BTD, _ = model_aux.forward(model, critic_params["backbone"], model_state or {}, batch)
  return ValueHead().apply({"params": critic_params["head"]}, hidden_BTD[:, :-1])


def token_rewards(batch: dict[str, jax.Array], beta: float = 0.0) -> jax.Array:
  """rewards_BT: batch["rewards"][b] on row b's last completion token; with
  beta > 0 also -beta (log π_old - log π_ref) on every completion token."""
  m_BT = batch["mask"].astype(jnp.float32)
  next_BT = jnp.concatenate([m_BT[:, 1:], jnp.zeros_like(m_BT[:, :1])], axis=1)
  r_BT = m_BT * (1.0 - next_BT) * batch["rewards"][:, None]
  if beta:
    r_BT = r_BT - beta * m_BT * (batch["old_logp"] - batch["ref_logp"])
  return r_BT


@functools.partial(jax.jit, static_argnames=("model", "gamma", "lam", "beta", "whiten_adv"))
def prepare(critic_params, critic_model_state, batch: dict[str, jax.Array], *, model,
            gamma: float, lam: float, beta: float, whiten_adv: bool) -> dict[str, jax.Array]:
  """The rollout's old values, GAE advantages and returns, per token."""
  values_BT = critic_values(critic_params, batch, model=model, model_state=critic_model_state)
  mask_BT = batch["mask"]
  adv_BT, ret_BT = gae(token_rewards(batch, beta), values_BT, mask_BT, gamma=gamma, lam=lam)
  if whiten_adv:
    adv_BT = whiten(adv_BT, mask_BT)
  return dict(advantages=adv_BT, returns=ret_BT, old_values=values_BT * mask_BT)


def ppo_train_step(states: tuple[TrainState, TrainState], batch: dict[str, jax.Array], *,
                   model, loss: PPOLoss, tx: optax.GradientTransformation,
                   critic_tx: optax.GradientTransformation, temperature: float,
                   impl: str = "auto") -> tuple[tuple[TrainState, TrainState], dict]:
  """One optimizer step of the policy and of the critic on the PPO objective
  (each skips a non-finite update, as apply_gradients does)."""
  policy, critic = states

  def loss_fn(pair):
    policy_params, critic_params = pair
    hidden_BTD, w_DV, extras = model_aux.policy_forward(model, policy_params, policy.model_state,
                                                        batch)
    logp_BT = token_logprobs_and_clip(hidden_BTD, w_DV, batch["tokens"][:, 1:],
                                      temperature=temperature, impl=impl).logp
    values_BT = critic_values(critic_params, batch, model=model, model_state=critic.model_state)
    value, metrics = loss.apply({}, logp_BT, batch["old_logp"], batch["advantages"], values_BT,
                                batch["old_values"], batch["returns"], batch["mask"])
    aux, aux_metrics = model_aux.auxiliary_loss(model, extras)
    objective = value if aux is None else value + aux
    return objective, (value, metrics, extras, aux_metrics)

  (objective, (value, metrics, extras, aux_metrics)), (g_policy, g_critic) = jax.value_and_grad(
      loss_fn, has_aux=True)((policy.params, critic.params))
  policy, guard = apply_gradients(
      policy, g_policy, objective, tx,
      model_state=model_aux.update_model_state(model, policy.model_state, extras))
  critic, critic_guard = apply_gradients(critic, g_critic, objective, critic_tx)
  metrics = dict(metrics, loss=value, **guard, critic_grad_norm=critic_guard["grad_norm"],
                 **aux_metrics, **model_aux.metrics(policy.model_state, extras))
  return (policy, critic), metrics


class Critic:
  """The critic's state and the jitted PPO pieces the GRPO loop calls."""

  def __init__(self, config: ml_collections.ConfigDict, *, model, mesh: Mesh, tx, init_params,
               init_model_state, policy_shardings, num_updates: int, impl: str,
               rules=DEFAULT_RULES):
    pc, gc = config.ppo, config.grpo
    self.config, self.model, self.beta = pc, model, gc.beta
    optim = config.optim.copy_and_resolve_references()
    optim.learning_rate = pc.critic_learning_rate or optim.learning_rate
    self.tx = make_optimizer(optim, num_updates)
    D = model.config.hidden_size
    head = ValueHead().init(jax.random.key(0), jnp.zeros((1, 1, D), jnp.float32))["params"]
    params = {"backbone": jax.tree.map(jnp.copy, init_params),
              "head": jax.device_put(head, replicated(mesh))}
    self.state, shardings = create_train_state(model, self.tx, mesh, config.seed + 1, params,
                                               rules, init_model_state=init_model_state)
    loss = PPOLoss(epsilon=pc.epsilon, value_clip=pc.value_clip, vf_coef=pc.vf_coef)
    step = functools.partial(ppo_train_step, model=model, loss=loss, tx=tx,
                             critic_tx=self.tx, temperature=gc.temperature, impl=impl)
    both = (policy_shardings, shardings)
    self._step = jax.jit(step, in_shardings=(both, batch_sharding(mesh)),
                         out_shardings=(both, None), donate_argnums=(0,))

  def prepare(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch` (with "rewards" per row) plus advantages/returns/old_values per token."""
    pc = self.config
    return dict(batch, **prepare(self.state.params, self.state.model_state, batch,
                                 model=self.model, gamma=pc.gamma, lam=pc.lam, beta=self.beta,
                                 whiten_adv=pc.whiten_advantages))

  def step(self, policy: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    (policy, self.state), metrics = self._step((policy, self.state), batch)
    return policy, metrics


def tree_bytes(tree: Any) -> int:
  """Bytes held by the arrays of `tree` (global sizes)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

"""DeepSeekMoE tests: the router against a NumPy transcription of DeepSeek's
reference gate (biased selection, un-biased weights, -inf group masking), the
aux-loss-free bias update balancing a skewed load, dropless (ragged_dot and
blocked) vs capacity dispatch, per-expert gradient flow, the drop count, and
the train steps' bias update and metrics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.models import moe
from r1jax.models.deepseek_v3 import DeepseekV3, DeepseekV3Config

E, G, TOPK_GROUP, K = 8, 4, 2, 2
ROUTE = dict(top_k=K, n_group=G, topk_group=TOPK_GROUP, routed_scaling_factor=2.5)
CONFIG = DeepseekV3Config(
    vocab_size=61, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=8, kv_lora_rank=8,
    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=E,
    n_shared_experts=1, num_experts_per_tok=K, n_group=G, topk_group=TOPK_GROUP,
    routed_scaling_factor=2.5, first_k_dense_replace=1, initializer_range=0.5)


def reference_gate(logits_TE, bias_E, *, top_k, n_group, topk_group, routed_scaling_factor,
                   masked_value=-np.inf):
  """DeepSeek-V3 inference/model.py `Gate.forward` (sigmoid, with bias), float64.
  `masked_value=0.0` is transformers 4.4x-4.5x's variant."""
  scores = 1 / (1 + np.exp(-np.asarray(logits_TE, np.float64)))
  original = scores
  scores = scores + bias_E
  T = scores.shape[0]
  grouped = scores.reshape(T, n_group, -1)
  group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
  top_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
  mask = np.ones((T, n_group), bool)
  np.put_along_axis(mask, top_groups, False, axis=1)
  scores = np.where(mask[..., None], masked_value, grouped).reshape(T, -1)
  indices = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
  weights = np.take_along_axis(original, indices, axis=1)
  weights = weights / weights.sum(-1, keepdims=True)
  return weights * routed_scaling_factor, indices, top_groups


def random_layer_variables(layer, x, valid, seed=0, std=0.5):
  """An MoE layer's params ~N(0, std) and zero biases, filled on the host
  (compiling `init` costs seconds on CPU)."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x, valid)
  rng = np.random.default_rng(seed)
  fill = lambda x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype)
  return {"params": jax.tree.map(fill, nn.unbox(shapes["params"])),
          moe.STATE: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[moe.STATE])}


def _sorted_pairs(weights, experts):
  order = np.argsort(experts, axis=-1)
  return np.take_along_axis(weights, order, -1), np.take_along_axis(experts, order, -1)


# ---------------------------------------------------------------------------
# Router.
# ---------------------------------------------------------------------------

def test_selection_uses_biased_scores_and_weights_the_unbiased_ones():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 1.5, (256, E)).astype(np.float32)
  bias = rng.normal(0, 0.3, E).astype(np.float32)
  weights, experts, scores = jax.jit(functools.partial(moe.route, **ROUTE))(logits, bias)
  want_w, want_e, _ = reference_gate(logits, bias, **ROUTE)
  got_w, got_e = _sorted_pairs(np.asarray(weights), np.asarray(experts))
  want_w, want_e = _sorted_pairs(want_w, want_e)
  np.testing.assert_array_equal(got_e, want_e)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 2.5, rtol=1e-5)  # renormalised x scale
  # The bias changed the choice of many tokens...
  _, unbiased_e, _ = reference_gate(logits, np.zeros(E), **ROUTE)
  changed = (np.sort(unbiased_e, -1) != got_e).any(-1)
  assert changed.mean() > 0.2
  # ... and the weights are not the biased scores renormalised.
  biased = np.take_along_axis(np.asarray(scores) + bias, got_e, -1)
  assert np.abs(biased / biased.sum(-1, keepdims=True) * 2.5 - got_w).max() > 1e-2


def test_masked_groups_never_receive_tokens():
  """A bias that makes every biased score negative: masking the other groups
  with 0.0 (transformers 4.4x-4.5x) would then route tokens into them; the
  reference's -inf never does."""
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2.0, (512, E)).astype(np.float32)
  bias = np.full(E, -3.0, np.float32) + rng.normal(0, 0.2, E).astype(np.float32)
  _, experts, _ = jax.jit(functools.partial(moe.route, **ROUTE))(logits, bias)
  experts = np.asarray(experts)
  _, want_e, top_groups = reference_gate(logits, bias, **ROUTE)
  np.testing.assert_array_equal(np.sort(experts, -1), np.sort(want_e, -1))
  in_top_group = (experts[..., None] // (E // G) == top_groups[:, None, :]).any(-1)
  assert in_top_group.all()
  _, zero_masked_e, _ = reference_gate(logits, bias, masked_value=0.0, **ROUTE)
  leaked = ~(zero_masked_e[..., None] // (E // G) == top_groups[:, None, :]).any(-1)
  assert leaked.any(-1).mean() > 0.5  # the divergent variant would leak most tokens


def test_bias_update_moves_load_toward_uniform():
  """A router whose logits favour some experts by up to ±1.5: 300 steps of
  bias += gamma * sign(mean - load) on the MoE layer's own load statistics
  (update_router_bias, as the train steps call it) cut max/mean load >= 2x."""
  c = CONFIG.replace(bias_update_rate=0.01)
  layer = moe.MoE(c)
  rng = np.random.default_rng(2)
  x = rng.normal(0, 1, (4, 64, c.hidden_size)).astype(np.float32)
  variables = random_layer_variables(layer, x, np.ones((4, 64), bool), std=0.05)
  params = variables["params"]
  offsets = np.linspace(-1.5, 1.5, E).astype(np.float32)
  rng.shuffle(offsets)
  params["gate"]["kernel"] = params["gate"]["kernel"].at[0].set(offsets)  # x[..., 0] = 1 below
  valid = jnp.ones((4, 64), bool)

  @jax.jit
  def run(state, keys):
    def step(state, key):
      x = jax.random.normal(key, (4, 64, c.hidden_size)).at[..., 0].set(1.0)
      _, out = layer.apply({"params": params, **state}, x, valid, mutable=[moe.STATS])
      load = out[moe.STATS]["load"]
      return {moe.STATE: moe.update_router_bias(state[moe.STATE], out[moe.STATS],
                                                c.bias_update_rate)}, load
    return jax.lax.scan(step, state, keys)

  state, loads = run({moe.STATE: variables[moe.STATE]}, jax.random.split(jax.random.key(1), 300))
  imbalance = lambda load: float(load.max() / load.mean())
  first, last = imbalance(loads[:10].sum(0)), imbalance(loads[-10:].sum(0))
  print(f"max/mean load: {first:.2f} -> {last:.2f}")
  assert first > 2.0 and last <= first / 2, (first, last)
  bias = np.asarray(state[moe.STATE]["gate"][moe.BIAS])
  assert np.corrcoef(bias, offsets)[0, 1] < -0.9  # favoured experts were pushed down


# ---------------------------------------------------------------------------
# Dispatch.
# ---------------------------------------------------------------------------

def _routing(seed, B=2, T=24, D=16, F=8, unused=()):
  """Random tokens, expert weights and top-K assignments avoiding `unused` experts."""
  rng = np.random.default_rng(seed)
  allowed = np.array([e for e in range(E) if e not in unused])
  experts = np.stack([rng.choice(allowed, K, replace=False) for _ in range(B * T)])
  w = lambda *shape: rng.normal(0, 0.5, shape).astype(np.float32)
  return (w(B, T, D), experts.reshape(B, T, K).astype(np.int32),
          rng.uniform(0.1, 1.0, (B, T, K)).astype(np.float32), w(E, D, F), w(E, D, F), w(E, F, D))


@jax.jit
def _all_dispatches(x, experts, weights, w_gate, w_up, w_down):
  valid = jnp.ones(x.shape[:2], bool)
  args = (x, experts, weights, w_gate, w_up, w_down)
  blocked = moe.dropless_experts(*args, impl="blocked")
  ragged = moe.dropless_experts(*args, impl="ragged_dot")
  capacity, dropped = moe.capacity_experts(x, experts, weights, valid, w_gate, w_up, w_down,
                                           capacity_factor=E / K)  # C = T: nothing dropped
  return blocked, ragged, capacity, dropped


def test_dropless_and_capacity_dispatch_agree_when_nothing_is_dropped():
  x, experts, weights, w_gate, w_up, w_down = _routing(3)
  blocked, ragged, capacity, dropped = _all_dispatches(x, experts, weights, w_gate, w_up, w_down)
  # Float64 NumPy: sum_k weight_k * SwiGLU_expert_k(x).
  silu = lambda z: z / (1 + np.exp(-z))
  xe = x.astype(np.float64)[..., None, :]  # [B, T, 1, D]
  h = silu(np.einsum("btkd,btkdf->btkf", xe.repeat(K, 2), w_gate[experts])) * np.einsum(
      "btkd,btkdf->btkf", xe.repeat(K, 2), w_up[experts])
  want = np.einsum("btkf,btkfd,btk->btd", h, w_down[experts], weights)
  assert float(dropped) == 0
  for name, got in [("blocked", blocked), ("ragged_dot", ragged), ("capacity", capacity)]:
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=name)


def test_grouped_matmul_blocked_equals_ragged_dot_with_empty_groups():
  rng = np.random.default_rng(4)
  sizes = np.array([5, 0, 17, 1, 0, 40, 3, 0], np.int32)
  x = rng.normal(0, 1, (int(sizes.sum()), 16)).astype(np.float32)
  w = rng.normal(0, 1, (E, 16, 8)).astype(np.float32)
  f = jax.jit(lambda x, w, s: (moe.grouped_matmul(x, w, s, impl="blocked"),
                               moe.grouped_matmul(x, w, s, impl="ragged_dot")))
  blocked, ragged = f(x, w, sizes)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(ragged), atol=1e-5, rtol=0)
  starts = np.cumsum(sizes) - sizes
  np.testing.assert_allclose(np.asarray(blocked)[starts[5]:starts[5] + 40], x[starts[5]:][:40] @ w[5],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_exactly_the_experts_that_received_tokens(dispatch):
  """Through the whole MoE layer (router included): experts 2 and 3 (group 1)
  get a bias of -10 and so no token; their weights get exactly zero gradient,
  every other expert's a non-zero one, and the router kernel is trained."""
  c = CONFIG.replace(dispatch=dispatch, capacity_factor=float(E))
  layer = moe.MoE(c)
  x = np.random.default_rng(5).normal(0, 1, (2, 24, c.hidden_size)).astype(np.float32)
  valid = np.ones((2, 24), bool)
  variables = random_layer_variables(layer, x, valid)
  bias = np.zeros(E, np.float32)
  bias[[2, 3]] = -10.0
  state = {moe.STATE: {"gate": {moe.BIAS: jnp.asarray(bias)}}}
  cot = np.random.default_rng(6).normal(0, 1, x.shape).astype(np.float32)

  @jax.jit
  def grads(params):
    def loss(p):
      out, stats = layer.apply({"params": p, **state}, x, valid, mutable=[moe.STATS])
      return jnp.sum(out * cot), stats[moe.STATS]
    return jax.grad(loss, has_aux=True)(params)

  g, stats = grads(variables["params"])
  load = np.asarray(stats["load"])
  assert (load[[2, 3]] == 0).all() and (np.delete(load, [2, 3]) > 0).all(), load
  assert float(stats["dropped"]) == 0
  for name in ("gate_proj", "up_proj", "down_proj"):
    per_expert = np.abs(np.asarray(g["experts"][name])).reshape(E, -1).max(-1)
    np.testing.assert_array_equal(per_expert[[2, 3]], 0.0, err_msg=name)
    assert (np.delete(per_expert, [2, 3]) > 0).all(), (name, per_expert)
  assert np.abs(np.asarray(g["gate"]["kernel"])).max() > 0


def test_capacity_drops_are_counted_and_excluded():
  """Capacity C = ceil(0.5 T K / E): first choices of all tokens queue before
  second choices, in token order; what does not fit is dropped, counted, and
  contributes nothing (the output equals dropless with those weights zeroed)."""
  x, experts, weights, w_gate, w_up, w_down = _routing(7, T=32)
  experts[..., 0] = np.where(np.arange(32) % 3 == 0, 0, experts[..., 0])  # crowd expert 0
  experts[..., 1] = np.where(experts[..., 1] == experts[..., 0], 7, experts[..., 1])
  experts[..., 1] = np.where(experts[..., 1] == experts[..., 0], 6, experts[..., 1])
  B, T = x.shape[:2]
  C = moe.capacity(T, K, E, 0.5)
  keep = np.zeros((B, T, K), bool)
  for b in range(B):
    used = np.zeros(E, int)
    for k in range(K):
      for t in range(T):
        e = experts[b, t, k]
        keep[b, t, k] = used[e] < C
        used[e] += 1
  f = jax.jit(lambda *a: moe.capacity_experts(a[0], a[1], a[2], jnp.ones((B, T), bool), *a[3:],
                                              capacity_factor=0.5))
  out, dropped = f(x, experts, weights, w_gate, w_up, w_down)
  assert float(dropped) == (~keep).sum() > 0
  want = jax.jit(functools.partial(moe.dropless_experts, impl="blocked"))(
      x, experts, np.where(keep, weights, 0.0), w_gate, w_up, w_down)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)
  metrics = moe.moe_metrics({}, {"layers_1": {"mlp": dict(
      load=jnp.ones(E), dropped=dropped, assignments=jnp.float32(B * T * K),
      balance_loss=jnp.float32(1.0))}})
  assert float(metrics["moe/layers_1/dropped_frac"]) == pytest.approx((~keep).mean())


# ---------------------------------------------------------------------------
# Train steps: the bias moves outside the optimizer; metrics are reported.
# ---------------------------------------------------------------------------

def test_train_steps_update_the_bias_and_report_moe_metrics(tmp_path):
  """One SFT step of a 1-layer MoE model: the router bias moves by exactly
  ±gamma (or 0) per expert from the layer's load, outside the optimizer;
  per-layer metrics are reported. The GRPO step is traced (eval_shape): same
  state update and metrics. The checkpoint carries the biases. (The MTP loss
  and its gradients: tests/test_deepseek_v3.py.)"""
  from r1jax.checkpoint.manager import Checkpointer, abstract_like
  from r1jax.losses.grpo import GRPOLoss
  from r1jax.trainers import grpo, sft
  from r1jax.trainers.state import TrainState

  c = CONFIG.replace(num_hidden_layers=1, first_k_dense_replace=0, bias_update_rate=0.01)
  model = DeepseekV3(c)
  tx = optax.adam(1e-2)
  # The train state of random host-filled variables (compiling `init` costs seconds).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(8)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                        nn.unbox(shapes["params"]))
  model_state = {moe.STATE: jax.tree.map(lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)),
                                         shapes[moe.STATE])}
  # Host-side arithmetic below: eager jnp ops would compile once per leaf shape.
  state = TrainState(step=jnp.asarray(0), params=params, opt_state=jax.jit(tx.init)(params),
                     rng=jax.random.key_data(jax.random.key(0)),
                     nonfinite_run=jnp.asarray(0), model_state=model_state)
  tokens = rng.integers(1, c.vocab_size, (2, 17)).astype(np.int32)
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
               positions=np.tile(np.arange(16), (2, 1)), segment_ids=np.ones((2, 16), np.int32),
               loss_weights=np.ones((2, 16), np.float32))
  # impl=reference: the log-prob kernels are tested on their own, and compile slower.
  new, m = jax.jit(functools.partial(sft.train_step, model=model, tx=tx, impl="reference"))(
      state, batch)

  routers = {"layers_0": ("layers_0", "mlp")}
  assert {"moe/load_max_over_mean", "moe/dropped_frac", "moe/balance_loss"} <= set(m)
  assert float(m["moe/dropped_frac"]) == 0 and float(m["moe/balance_loss"]) > 0
  bias = lambda st, path: np.asarray(
      functools.reduce(lambda t, k: t[k], path + ("gate", moe.BIAS), st.model_state[moe.STATE]))
  for name, path in routers.items():
    assert float(m[f"moe/{name}/load_max_over_mean"]) >= 1.0
    assert float(m[f"moe/{name}/dropped_frac"]) == 0
    # bias += gamma * sign(mean - load): every entry moved by exactly +-gamma or 0.
    steps = np.round((bias(new, path) - bias(state, path)) / c.bias_update_rate, 4)
    assert set(steps.tolist()) <= {-1.0, 0.0, 1.0} and (steps != 0).any(), (name, steps)
    np.testing.assert_allclose(m[f"moe/{name}/bias_norm"], np.linalg.norm(bias(new, path)),
                               rtol=1e-5)
  # The optimizer never sees the bias; the params all moved.
  assert moe.BIAS not in str(jax.tree.structure(new.opt_state))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       new.params, state.params)
  assert min(jax.tree.leaves(moved)) > 0

  gbatch = dict(tokens=batch["tokens"], positions=batch["positions"],
                segment_ids=batch["segment_ids"], mask=np.ones((2, 15), np.float32),
                old_logp=np.full((2, 15), -4.0, np.float32),
                advantages=np.array([1.0, -1.0], np.float32), truncated=np.zeros(2, bool))
  step = functools.partial(grpo.grpo_train_step, model=model, loss=GRPOLoss(beta=0.0), tx=tx,
                           temperature=1.0)
  traced_state, traced_m = jax.eval_shape(step, new, gbatch)
  assert jax.tree.structure(traced_state) == jax.tree.structure(new)
  assert {"moe/layers_0/load_max_over_mean", "moe/layers_0/bias_norm", "loss"} <= set(traced_m)

  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, new, {}, force=True)
  restored, _ = ckpt.restore(abstract_like(new))
  ckpt.close()
  for path in routers.values():
    np.testing.assert_array_equal(bias(restored, path), bias(new, path))

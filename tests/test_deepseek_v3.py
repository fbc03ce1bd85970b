"""DeepSeek-V3 model tests: logits against transformers on the same random
weights (loaded from its safetensors by name), the MLA latent cache (shape,
cached decode == full forward), YaRN against DeepSeek's reference formula,
presets through jax.eval_shape (671B / 37B), MTP loss and the conversion
round trip."""

import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.models import deepseek_v3 as dsv3
from r1jax.models import mla, moe
from r1jax.models.deepseek_v3 import DeepseekV3, DeepseekV3Config
from tests.test_model import shared_prefix_logits

SMALL = DeepseekV3Config(
    vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=12,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=64,
    initializer_range=0.2)  # one dense layer, then one MoE layer


def random_variables(model, seed=0, bias_scale=0.0, std=None):
  """Random params ~N(0, std) (norm scales 1 + noise) and router biases ~N(0,
  bias_scale), filled on the host (compiling `init` would cost seconds)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  shapes = {k: nn.unbox(v) for k, v in shapes.items() if k in ("params", moe.STATE)}
  rng = np.random.default_rng(seed)
  std = std or model.config.initializer_range

  def fill(path, x):
    if getattr(path[-1], "key", None) == moe.BIAS:
      return jnp.asarray(rng.normal(0.0, bias_scale, x.shape), x.dtype)
    return jnp.asarray(rng.normal(0.0, std, x.shape) + (path[-1].key == "scale"), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def apply(model, variables, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
  """model.apply (logits, cache), jitted once per model and shape."""
  return model.apply(variables, tokens_BT, positions_BT, segment_ids_BT, cache)


@functools.partial(jax.jit, static_argnums=0)
def forward_with_stats(model, variables, tokens_BT):
  """No-cache logits and the per-layer router statistics."""
  (logits, _), stats = model.apply(variables, tokens_BT, mutable=[moe.STATS])
  return logits, stats[moe.STATS]


# ---------------------------------------------------------------------------
# Parity with transformers.
# ---------------------------------------------------------------------------

def _hf_model(tmp_path, *, rope_parameters):
  """A random DeepseekV3ForCausalLM saved with save_pretrained; weights ~N(0, 0.2),
  router biases ~N(0, 0.1) so that they change expert choices."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = SMALL
  hf_config = transformers.DeepseekV3Config(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
      q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
      qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
      v_head_dim=c.v_head_dim, n_routed_experts=c.n_routed_experts,
      n_shared_experts=c.n_shared_experts, num_experts_per_tok=c.num_experts_per_tok,
      n_group=c.n_group, topk_group=c.topk_group,
      routed_scaling_factor=c.routed_scaling_factor,
      first_k_dense_replace=c.first_k_dense_replace,
      max_position_embeddings=c.max_position_embeddings, rope_parameters=rope_parameters,
      num_mtp_layers=0, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(hf_config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(torch.randn_like(b) * 0.1)
  model.save_pretrained(tmp_path)
  return model


def _load_r1jax(path, **overrides):
  from safetensors.numpy import load_file
  with open(os.path.join(path, "config.json")) as f:
    config = dsv3.config_from_hf(json.load(f), **overrides)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  params = dsv3.params_from_hf(tensors.__getitem__, config)
  state = dsv3.model_state_from_hf(tensors.__getitem__, config)
  return config, {"params": jax.tree.map(jnp.asarray, params), **state}, tensors


YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
# What config_from_hf makes of the checkpoint above (transformers' default
# initializer_range); the cache test uses it too, sharing compiled programs.
PARITY = SMALL.replace(
    rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_original_max_position_embeddings=16,
    rope_mscale=1.0, rope_mscale_all_dim=1.0, initializer_range=0.02)
TOKENS = np.random.default_rng(0).integers(0, SMALL.vocab_size, (3, 40)).astype(np.int32)
TOL = 1e-4


def test_logits_match_transformers(tmp_path):
  """MLA (q/kv latents, interleaved rope, YaRN mscale), dense-first layers and
  MoE layers (groups, selection bias, shared expert) against transformers on
  the same weights, read by name from its safetensors.

  The router biases are large enough that they change which experts are picked
  in every MoE layer on this batch; with them zeroed both sides change their
  logits, and still agree."""
  torch = pytest.importorskip("torch")
  hf = _hf_model(tmp_path, rope_parameters=YARN)
  config, variables, tensors = _load_r1jax(tmp_path)
  assert config == PARITY and mla.yarn_active(config)
  model = DeepseekV3(config)
  run_hf = lambda: hf(torch.from_numpy(TOKENS).long()).logits.detach().numpy()

  want = run_hf()
  got, stats = forward_with_stats(model, variables, jnp.asarray(TOKENS))
  err = np.abs(np.asarray(got) - want).max()
  print(f"max |logits - transformers| = {err:.2e} (logits up to {np.abs(want).max():.1f})")
  assert err < TOL and np.abs(want).max() > 1.0

  zero = {**variables, moe.STATE: jax.tree.map(jnp.zeros_like, variables[moe.STATE])}
  got_unbiased, stats_unbiased = forward_with_stats(model, zero, jnp.asarray(TOKENS))
  for i in range(config.first_k_dense_replace, config.num_hidden_layers):
    loads = [np.asarray(s[f"layers_{i}"]["mlp"]["load"]) for s in (stats, stats_unbiased)]
    assert (loads[0] != loads[1]).any(), f"layer {i}: the bias picked the same experts"
  with torch.no_grad():
    for name, b in hf.named_buffers():
      if name.endswith(moe.BIAS):
        b.zero_()
  want_unbiased = run_hf()
  assert np.abs(want_unbiased - want).max() > 1e2 * TOL
  assert np.abs(np.asarray(got_unbiased) - want_unbiased).max() < TOL


def test_hf_conversion_round_trip_and_config(tmp_path):
  """params_to_hf inverts params_from_hf tensor by tensor (MTP layer included);
  config_to_hf is read back by transformers and by config_from_hf."""
  transformers = pytest.importorskip("transformers")
  config = SMALL.replace(num_nextn_predict_layers=1, rope_scaling_type="yarn",
                         rope_scaling_factor=4.0, rope_original_max_position_embeddings=16,
                         rope_mscale_all_dim=1.0)
  variables = jax.tree.map(np.asarray, random_variables(DeepseekV3(config), bias_scale=0.1))
  tensors = dsv3.params_to_hf(variables["params"], config, variables)
  assert "model.layers.2.eh_proj.weight" in tensors  # the MTP module after the 2 layers
  assert tensors["model.layers.1.mlp.experts.5.gate_proj.weight"].shape == (16, 32)
  back = dsv3.params_from_hf(tensors.__getitem__, config)
  state = dsv3.model_state_from_hf(tensors.__getitem__, config)
  for a, b in zip(jax.tree.leaves((variables["params"], variables[moe.STATE])),
                  jax.tree.leaves((back, state[moe.STATE]))):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(back) == jax.tree.structure(variables["params"])
  with pytest.raises(ValueError, match="router biases"):
    dsv3.params_to_hf(variables["params"], config)

  hf_config = transformers.DeepseekV3Config(**dsv3.config_to_hf(config))
  hf_config.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    assert dsv3.config_from_hf(json.load(f), initializer_range=0.2) == config


def test_config_from_deepseek_v3_config_json():
  """DeepSeek-V3's published config.json (4.x layout) gives the 671B preset."""
  published = dict(
      architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280,
      hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
      num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
      num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
      routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
      v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
      num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
      scoring_func="sigmoid", hidden_act="silu", max_position_embeddings=163840,
      initializer_range=0.02, rms_norm_eps=1e-06, tie_word_embeddings=False, rope_theta=10000,
      rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                        original_max_position_embeddings=4096, type="yarn"),
      attention_bias=False, torch_dtype="bfloat16")
  got = dsv3.config_from_hf(published, dtype="bfloat16", param_dtype="bfloat16")
  assert got == dsv3.PRESETS["deepseek-v3"]
  with pytest.raises(ValueError, match="scoring_func"):
    dsv3.config_from_hf({**published, "scoring_func": "softmax"})


# ---------------------------------------------------------------------------
# MLA cache.
# ---------------------------------------------------------------------------

def left_pad(seqs, P):
  """Left-padded tokens, segment ids (0 = pad) and positions restarting at 0."""
  tokens = np.zeros((len(seqs), P), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, P - len(s):] = s
  valid = (np.arange(P)[None] >= P - np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  return tokens, valid, np.maximum(np.cumsum(valid, 1) - 1, 0)


def test_mla_cache_holds_latent_and_rope_key_and_decode_equals_forward():
  """Left-padded batched prefill + one-token decode through the latent cache
  (absorbed attention) reproduces the full forward (expanded keys/values) of
  each sequence: MLA, YaRN and the routed layers, position by position."""
  c = PARITY
  model = DeepseekV3(c)
  variables = random_variables(model, seed=1, bias_scale=0.1, std=0.2)
  prompt_lens, P, L = (1, 13, 31), 32, TOKENS.shape[1]
  tokens, valid, positions = left_pad([s[:n] for s, n in zip(TOKENS, prompt_lens)], P)
  cache = model.init_cache(3, P + L)
  # Only the compressed latent and the shared rope key: R + Hr numbers per token.
  assert [x.shape for x in jax.tree.leaves(cache.layers[0])] == [(3, P + L, c.kv_lora_rank),
                                                                   (3, P + L, c.qk_rope_head_dim)]
  assert len(jax.tree.leaves(cache.layers)) == 2 * c.num_hidden_layers

  logits, cache = apply(model, variables, tokens, positions, valid, cache)
  out = [list(np.asarray(logits)[i, P - n:]) for i, n in enumerate(prompt_lens)]
  for j in range(L - min(prompt_lens)):
    step = np.array([s[min(n + j, L - 1)] for s, n in zip(TOKENS, prompt_lens)])[:, None]
    pos = np.array([n + j for n in prompt_lens])[:, None]
    logits, cache = apply(model, variables, step, pos, np.ones_like(step), cache)
    for i, n in enumerate(prompt_lens):
      if n + j < L:
        out[i].append(np.asarray(logits)[i, 0])
  assert cache.layers[0].kv_latent.shape == (3, P + L, c.kv_lora_rank)
  full, _ = forward_with_stats(model, variables, jnp.asarray(TOKENS))
  print("max |cached - full| =", max(np.abs(np.stack(o) - np.asarray(full)[i]).max()
                                     for i, o in enumerate(out)))
  for i in range(3):
    np.testing.assert_allclose(np.stack(out[i]), np.asarray(full)[i], atol=1e-4, rtol=0,
                               err_msg=f"sequence {i}")
  # A wrong decode position is far outside the tolerance: the check can fail.
  logits_off, _ = apply(model, variables, step, pos + 1, np.ones_like(step), cache)
  assert np.abs(np.asarray(logits_off) - np.asarray(logits)).max() > 1e-2


def test_mla_shared_prefix_decode_equals_full_forward():
  """Rows decoding after a prompt shared through SharedPrefix (latent prefix
  read once per prompt) reproduce each row's full forward."""
  c = PARITY
  model = DeepseekV3(c)
  variables = random_variables(model, seed=1, bias_scale=0.1, std=0.2)
  G, prompt_lens = 2, (1, 13, 7)
  prompts = [s[:n] for s, n in zip(TOKENS, prompt_lens)]
  conts = TOKENS[:, 20:26].repeat(G, axis=0)[::-1].copy()
  got = shared_prefix_logits(model, apply, variables, prompts, conts, G)
  for r, cont in enumerate(conts):
    prompt = prompts[r // G]
    full, _ = forward_with_stats(model, variables, jnp.asarray(np.concatenate([prompt, cont]))[None])
    np.testing.assert_allclose(got[r], np.asarray(full)[0, len(prompt):], atol=TOL, rtol=0,
                               err_msg=f"row {r}")


# ---------------------------------------------------------------------------
# YaRN: DeepSeek's reference formula (inference/model.py precompute_freqs_cis).
# ---------------------------------------------------------------------------

def deepseek_inv_freq_reference(dim, base, factor, original_seq_len, beta_fast, beta_slow,
                                max_seq_len):
  """DeepSeek-V3 inference/model.py, in float64."""
  freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if max_seq_len > original_seq_len:
    corr = lambda rot: dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high > low else 0.001), 0, 1)
    smooth = 1 - ramp
    freqs = freqs / factor * (1 - smooth) + freqs * smooth
  return freqs


def test_yarn_matches_deepseek_reference():
  c = dsv3.PRESETS["deepseek-v3"]
  want = deepseek_inv_freq_reference(64, 10000.0, 40.0, 4096, 32, 1, 163840)
  np.testing.assert_allclose(mla.rope_inv_freq(c), want, rtol=1e-6)
  unscaled = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  ratio = want / unscaled
  assert (ratio == 1).any() and np.isclose(ratio, 1 / 40).any()  # all three bands occur
  assert ((ratio > 1 / 40 + 1e-6) & (ratio < 1 - 1e-6)).any()
  mscale = 0.1 * math.log(40.0) + 1.0
  assert mla.softmax_scale(c) == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)
  assert mla.rope_attention_factor(c) == 1.0


def test_yarn_is_off_when_the_context_is_not_extended():
  """Divergent case (not in the parity test): transformers applies YaRN whenever
  rope_type is yarn; DeepSeek's reference (and r1jax) only when
  max_position_embeddings > original_max_position_embeddings."""
  c = dsv3.PRESETS["deepseek-v3"].replace(max_position_embeddings=4096)
  assert not mla.yarn_active(c)
  want = deepseek_inv_freq_reference(64, 10000.0, 40.0, 4096, 32, 1, 4096)
  np.testing.assert_allclose(mla.rope_inv_freq(c), want, rtol=1e-6)
  np.testing.assert_allclose(want, 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64), rtol=1e-12)
  assert mla.softmax_scale(c) == pytest.approx(192 ** -0.5, rel=1e-12)


# ---------------------------------------------------------------------------
# Presets: shapes and counts through jax.eval_shape.
# ---------------------------------------------------------------------------

def _layer_counts(config):
  """eval_shape of a 2-layer twin (one dense, one MoE layer, real widths):
  (embedding/norm/head, dense layer, MoE layer, MoE layer's routed experts).
  Every dense layer has the same shapes, and so does every MoE layer."""
  twin = config.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  (logits, _), variables = jax.eval_shape(
      lambda t: DeepseekV3(twin).init_with_output(jax.random.key(0), t), tokens)
  assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == jnp.float32
  params = nn.unbox(variables["params"])
  n = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  dense, moe_layer = n(params["layers_0"]), n(params["layers_1"])
  return n(params) - dense - moe_layer, dense, moe_layer, n(params["layers_1"]["mlp"]["experts"])


@pytest.mark.parametrize("name,total,active", [
    ("deepseek-v3", 671e9, 37e9),  # published: 671B total, 37B activated (main model)
    ("deepseek-v3-lite-16b", 15.7e9, 2.4e9),  # DeepSeek-V2-Lite's shapes: 15.7B / 2.4B
])
def test_preset_param_counts(name, total, active):
  c = dsv3.PRESETS[name]
  base, dense, moe_layer, routed = _layer_counts(c)
  k, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
  got_total = base + k * dense + n_moe * moe_layer
  unused = routed * (c.n_routed_experts - c.num_experts_per_tok) // c.n_routed_experts
  embedding = c.vocab_size * c.hidden_size  # a lookup: not counted as activated
  got_active = got_total - n_moe * unused - embedding
  print(f"{name}: {got_total / 1e9:.2f}B total, {got_active / 1e9:.2f}B activated")
  assert got_total == pytest.approx(total, rel=5e-3)
  assert got_active == pytest.approx(active, rel=0.03)


@pytest.mark.slow
def test_full_depth_presets_through_eval_shape():
  """The whole 61-layer model (and its MTP module) traced: same counts as above."""
  for name, total, active in [("deepseek-v3", 671e9, 37e9), ("deepseek-v3-lite-16b", 15.7e9, 2.4e9)]:
    c = dsv3.PRESETS[name]
    variables = jax.eval_shape(DeepseekV3(c).init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 4), jnp.int32))
    params = nn.unbox(variables["params"])
    assert dsv3.count_main_params(params) == pytest.approx(total, rel=5e-3)
    assert dsv3.count_active_params(params, c) == pytest.approx(active, rel=0.03)


def test_tiny_preset_has_the_v3_structure():
  c = dsv3.PRESETS["deepseek-v3-tiny"]
  assert c.first_k_dense_replace >= 2 and c.num_hidden_layers - c.first_k_dense_replace >= 2
  assert c.n_group > 1 and 1 < c.topk_group < c.n_group and c.n_shared_experts >= 1
  assert c.q_lora_rank and c.kv_lora_rank and c.num_experts_per_tok > 1
  base, dense, moe_layer, routed = _layer_counts(c)
  assert base + 2 * dense + 2 * moe_layer < 2e6  # CPU-sized


# ---------------------------------------------------------------------------
# Multi-token prediction.
# ---------------------------------------------------------------------------

def test_mtp_targets_stay_inside_documents():
  from r1jax.trainers import model_aux
  mtp_targets = jax.jit(model_aux.mtp_targets, static_argnums=2)
  targets = np.array([[10, 11, 12, 13, 20, 21, 0, 0]])
  weights = np.array([[1, 1, 1, 0, 1, 0, 0, 0]], np.float32)  # doc a: 0..3, doc b: 4..5
  t1, w1 = mtp_targets(jnp.asarray(targets), jnp.asarray(weights), 1)
  np.testing.assert_array_equal(t1, [[11, 12, 13, 20, 21, 0, 0, 0]])
  np.testing.assert_array_equal(w1, [[1, 1, 0, 0, 0, 0, 0, 0]])
  t2, w2 = mtp_targets(jnp.asarray(targets), jnp.asarray(weights), 2)
  np.testing.assert_array_equal(t2[0, :2], [12, 13])
  np.testing.assert_array_equal(w2, [[1, 0, 0, 0, 0, 0, 0, 0]])


@functools.partial(jax.jit, static_argnums=0)
def _mtp_loss_grads(model, variables, batch):
  """Gradients of the train steps' auxiliary loss (MTP cross-entropy + balance),
  its metrics and the MTP hidden states."""
  from r1jax.models.transformer import output_weights_DV
  from r1jax.trainers import model_aux

  def loss(params):
    _, extras = model_aux.forward(model, params, {moe.STATE: variables[moe.STATE]}, batch,
                                  mtp=True)
    aux, metrics = model_aux.auxiliary_loss(model, extras, batch=batch, impl="reference",
                                            w_DV=output_weights_DV(model.config, params))
    return aux, (metrics, extras["mtp"]["hidden_1"][0])

  return jax.grad(loss, has_aux=True)(variables["params"])


def test_mtp_loss_sees_the_next_token_and_trains_module_and_trunk():
  """MTP depth 1 at position i combines the main model's state at i with the
  embedding of token i+1: changing token i+1 changes it, token i+2 does not.
  Its loss (targets two ahead) reaches the MTP module and the main layers."""
  model = DeepseekV3(SMALL.replace(num_hidden_layers=1, num_nextn_predict_layers=1))
  variables = random_variables(model, seed=2, bias_scale=0.1)
  tokens = TOKENS[:, :17]

  def batch(tokens):
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=np.tile(np.arange(16), (3, 1)),
                segment_ids=np.ones((3, 16), np.int32), loss_weights=np.ones((3, 16), np.float32))

  grads, (metrics, base) = _mtp_loss_grads(model, variables, batch(tokens))
  changed = tokens.copy()
  changed[:, 9] = (changed[:, 9] + 1) % SMALL.vocab_size
  _, (_, moved) = _mtp_loss_grads(model, variables, batch(changed))
  np.testing.assert_allclose(np.asarray(moved)[:, :8], np.asarray(base)[:, :8], atol=1e-6, rtol=0)
  assert np.abs(np.asarray(moved)[:, 8] - np.asarray(base)[:, 8]).min() > 1e-4  # reads token 9
  assert 0 < float(metrics["mtp_loss"]) < 10
  largest = lambda tree: max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(tree))
  assert largest(grads["mtp_0"]["eh_proj"]) > 0 and largest(grads["mtp_0"]["block"]) > 0
  assert largest(grads["layers_0"]) > 0  # the trunk learns from the MTP loss too
  # Without the "mtp" collection the MTP block does not run: its router reports nothing.
  assert "mtp_0" in variables["params"]
  _, stats = jax.eval_shape(lambda: model.apply(variables, jnp.asarray(tokens),
                                                mutable=[moe.STATS]))
  assert moe.STATS not in stats  # layers_0 is dense; no MoE block ran
  _, stats = jax.eval_shape(lambda: model.apply(variables, jnp.asarray(tokens),
                                                mutable=[moe.STATS, "mtp"]))
  assert "mtp_0" in stats[moe.STATS]


def test_experts_shard_over_the_expert_axis():
  """Routed experts map to the `expert` mesh axis (then fsdp x tensor); the
  router biases are state, replicated; meshes without `expert` still build."""
  from r1jax.parallel.mesh import DEFAULT_RULES, make_mesh
  variables = jax.eval_shape(DeepseekV3(SMALL).init, jax.random.key(0),
                             jnp.zeros((1, 8), jnp.int32))
  specs = nn.get_partition_spec(variables["params"])
  mesh_axes = lambda spec: tuple(nn.logical_to_mesh_axes(spec, DEFAULT_RULES))
  experts = specs["layers_1"]["mlp"]["experts"]
  assert mesh_axes(experts["gate_proj"]) == ("expert", "fsdp", "tensor")
  assert mesh_axes(experts["down_proj"]) == ("expert", "tensor", "fsdp")
  assert mesh_axes(specs["layers_1"]["mlp"]["shared_experts"]["up_proj"]["kernel"]) == (
      "fsdp", "tensor")
  assert not isinstance(variables[moe.STATE]["layers_1"]["mlp"]["gate"][moe.BIAS],
                        nn.LogicallyPartitioned)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  assert mesh.shape["expert"] == 1

"""Dense decoder tests: KV-cache / causality / packing invariants on small
configs, rope scaling against float64 NumPy, and every real preset
shape-checked (and its parameters counted) through `jax.eval_shape`."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.models.config import PRESETS, get_preset
from r1jax.models.layers import rope_inv_freq
from r1jax.models.transformer import SharedPrefix, Transformer, count_params, init_cache

SMALL = get_preset(
    "tiny", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    tie_word_embeddings=True, initializer_range=0.1, dtype="float32", param_dtype="float32")
VARIANTS = {
    "gqa": SMALL,
    "mha": SMALL.replace(num_key_value_heads=4),
    "mqa_head_dim": SMALL.replace(num_key_value_heads=1, head_dim=24),
    "qkv_bias": SMALL.replace(qkv_bias=True),
    "untied": SMALL.replace(tie_word_embeddings=False),
}
ATOL = 1e-5


def random_params(model, seed=0):
  """Random params filled on the host: compiling the threefry-based `init`
  costs ~10 s on CPU; this costs milliseconds. Biases are random too (so the
  qkv_bias variant exercises them); norm scales are 1 + noise."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)
  std = model.config.initializer_range

  def fill(path, x):
    return jnp.asarray(rng.normal(0.0, std, x.shape) + (path[-1].key == "scale"), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None):
  """model.apply, jitted once per model and shape (eager apply costs seconds)."""
  return model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache)


def forward(model, params, tokens):
  """No-cache logits [T, V] of one unpadded sequence."""
  return np.asarray(apply(model, params, jnp.asarray(tokens, jnp.int32)[None])[0][0])


def left_pad(seqs, P):
  """Left-padded tokens, segment ids (0 = pad) and positions restarting at 0."""
  tokens = np.zeros((len(seqs), P), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, P - len(s):] = s
  valid = (np.arange(P)[None] >= P - np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
  return tokens, valid, positions


# Every test sequence has SEQ_LEN tokens: a prompt of PROMPT_LENS[i] tokens
# (left padded to P slots by 11, 6 and 1) and a teacher-forced continuation
# decoded one token at a time. Equal lengths mean one compiled reference forward.
PROMPT_LENS, P, SEQ_LEN = (1, 6, 11), 12, 16


def _sequences():
  rng = np.random.default_rng(1)
  return [rng.integers(1, 97, SEQ_LEN).astype(np.int32) for _ in PROMPT_LENS]


def cached_logits(model, params, seqs, chunks, position_error=0):
  """Logits [SEQ_LEN, V] of every sequence: its prompt prefilled in `chunks`
  pieces (batched, left padded), then its continuation decoded through the cache."""
  prompts = [s[:n] for s, n in zip(seqs, PROMPT_LENS)]
  tokens, valid, positions = left_pad(prompts, P)
  n_decode = SEQ_LEN - min(PROMPT_LENS)
  cache = init_cache(model.config, len(seqs), P + n_decode)
  bounds = np.linspace(0, P, chunks + 1).astype(int)
  pieces = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    logits, cache = apply(model, params, tokens[:, a:b], positions[:, a:b], valid[:, a:b],
                          cache)
    pieces.append(np.asarray(logits))
  prefill = np.concatenate(pieces, 1)
  out = [list(prefill[i, P - n:]) for i, n in enumerate(PROMPT_LENS)]
  # Rows whose sequence is complete keep decoding (a pad token); ignored.
  padded = np.stack([np.pad(s, (0, n_decode)) for s in seqs])
  lens = np.array(PROMPT_LENS)
  for j in range(n_decode):
    step_B1 = padded[np.arange(len(seqs)), lens + j][:, None]
    positions_B1 = (lens + j + position_error)[:, None]
    logits, cache = apply(model, params, step_B1, positions_B1, np.ones_like(step_B1), cache)
    for i in range(len(seqs)):
      if len(out[i]) < SEQ_LEN:
        out[i].append(np.asarray(logits)[i, 0])
  return [np.stack(o) for o in out]


@pytest.mark.parametrize("name,chunks", [(name, 1) for name in VARIANTS] + [("gqa", 2)],
                         ids=list(VARIANTS) + ["gqa-chunked_prefill"])
def test_cached_decode_equals_full_forward(name, chunks):
  """Left-padded batched prefill + decode through the cache reproduces each
  sequence's unpadded no-cache forward, position by position."""
  model = Transformer(VARIANTS[name])
  params = random_params(model)
  seqs = _sequences()
  got = cached_logits(model, params, seqs, chunks)
  for i, seq in enumerate(seqs):
    np.testing.assert_allclose(got[i], forward(model, params, seq), atol=ATOL, rtol=0,
                               err_msg=f"sequence {i} (prompt length {PROMPT_LENS[i]})")


def shared_prefix_logits(model, run, variables, prompts, conts, G):
  """Logits [C, V] of each row's continuation: the prompts prefilled once
  (left padded) into a SharedPrefix, then each prompt's G rows decode their
  own continuations (row = prompt * G + sample) into their own caches, the
  first 3 tokens in one call and the rest one by one. `run` is the test
  file's jitted apply on (variables, tokens, positions, segment ids, cache)."""
  P = max(len(p) for p in prompts)
  tokens, valid, positions = left_pad(prompts, P)
  _, prompt_cache = run(model, variables, tokens, positions, valid,
                        model.init_cache(len(prompts), P))
  C = conts.shape[1]
  cache = model.init_cache(len(conts), C).replace(
      prefix=SharedPrefix(layers=prompt_cache.layers, valid_BS=prompt_cache.valid_BS))
  start = np.repeat([len(p) for p in prompts], G)[:, None]
  pieces = []
  for a, b in [(0, 3)] + [(t, t + 1) for t in range(3, C)]:
    logits, cache = run(model, variables, conts[:, a:b], start + np.arange(a, b),
                        np.ones((len(conts), b - a), np.int32), cache)
    pieces.append(np.asarray(logits))
  return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("name", ["gqa", "mqa_head_dim", "qkv_bias"])
def test_shared_prefix_decode_equals_full_forward(name):
  """Rows decoding after a prompt shared through SharedPrefix (the sampler's
  prefix sharing: the prompt's cache read once per prompt, never repeated)
  reproduce each row's unpadded no-cache forward."""
  model = Transformer(VARIANTS[name])
  params = random_params(model)
  G, rng = 2, np.random.default_rng(4)
  prompts = [s[:n] for s, n in zip(_sequences(), PROMPT_LENS)]
  conts = rng.integers(1, 97, (len(prompts) * G, 6)).astype(np.int32)
  got = shared_prefix_logits(model, apply, params, prompts, conts, G)
  for r, cont in enumerate(conts):
    prompt = prompts[r // G]
    want = forward(model, params, np.concatenate([prompt, cont]))[len(prompt):]
    np.testing.assert_allclose(got[r], want, atol=ATOL, rtol=0, err_msg=f"row {r}")
  # Another prompt's prefix gives other logits: the check can fail.
  swapped = shared_prefix_logits(model, apply, params, prompts[::-1], conts, G)
  assert np.abs(swapped[0] - got[0]).max() > 1e3 * ATOL


def test_cache_check_detects_a_position_error():
  """The tolerance above is far below the effect of an off-by-one decode position."""
  model = Transformer(SMALL)
  params = random_params(model)
  seqs = _sequences()
  got = cached_logits(model, params, seqs, chunks=1, position_error=1)
  for i, (seq, n) in enumerate(zip(seqs, PROMPT_LENS)):
    assert np.abs(got[i][n:] - forward(model, params, seq)[n:]).max() > 1e3 * ATOL


def test_causal():
  model = Transformer(SMALL)
  params = random_params(model)
  tokens = np.random.default_rng(2).integers(1, 97, (1, SEQ_LEN)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 9] = (changed[:, 9] + 1) % 97
  a, _ = apply(model, params, tokens)
  b, _ = apply(model, params, changed)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
  assert np.abs(a[:, 9] - b[:, 9]).max() > 1e3 * ATOL  # the changed token is seen


def test_packed_segments_equal_separate_documents():
  model = Transformer(SMALL)
  params = random_params(model)
  rng = np.random.default_rng(3)
  doc_a, doc_b = rng.integers(1, 97, 5), rng.integers(1, 97, 7)
  tokens = np.concatenate([doc_a, doc_b, [0, 0]])[None]
  segments = np.array([[1] * 5 + [2] * 7 + [0, 0]])
  positions = np.array([list(range(5)) + list(range(7)) + [0, 0]])
  packed = np.asarray(apply(model, params, tokens, positions, segments)[0][0])
  np.testing.assert_allclose(packed[:5], forward(model, params, doc_a), atol=ATOL, rtol=0)
  np.testing.assert_allclose(packed[5:12], forward(model, params, doc_b), atol=ATOL, rtol=0)
  # Without segment ids document b would attend to a: the check can fail.
  unsegmented = np.asarray(apply(model, params, tokens, positions, np.ones_like(segments))[0][0])
  assert np.abs(unsegmented[5:12] - packed[5:12]).max() > 1e3 * ATOL


def llama3_inv_freq_reference(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                              old_len):
  """Hugging Face `_compute_llama3_parameters`, in float64."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  out = np.empty_like(inv_freq)
  for i, f in enumerate(inv_freq):
    wavelen = 2 * math.pi / f
    if wavelen > old_len / low_freq_factor:
      out[i] = f / factor
    elif wavelen < old_len / high_freq_factor:
      out[i] = f
    else:
      smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out[i] = (1 - smooth) * f / factor + smooth * f
  return out


def test_llama3_rope_scaling_matches_float64_reference():
  c = PRESETS["llama3.1-8b"]
  want = llama3_inv_freq_reference(
      c.head_size, c.rope_theta, c.rope_scaling_factor, c.rope_low_freq_factor,
      c.rope_high_freq_factor, c.rope_original_max_position_embeddings)
  got = np.asarray(rope_inv_freq(c), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  # All three bands occur, so each branch of the formula is checked.
  unscaled = 1.0 / c.rope_theta ** (np.arange(0, c.head_size, 2) / c.head_size)
  ratio = want / unscaled
  assert (ratio == 1).any() and (ratio == 1 / c.rope_scaling_factor).any()
  assert ((ratio > 1 / c.rope_scaling_factor) & (ratio < 1)).any()


# Published parameter counts (safetensors totals; Qwen2.5-32B's card rounds to 32.5B).
PUBLISHED_PARAMS = {
    "qwen2.5-math-1.5b": 1.54e9,
    "qwen2.5-math-7b": 7.62e9,
    "qwen2.5-14b": 14.77e9,
    "qwen2.5-32b": 32.76e9,
    "llama3.1-8b": 8.03e9,
    "llama3.3-70b": 70.55e9,
}


def test_every_real_preset_has_a_published_count():
  assert set(PUBLISHED_PARAMS) == {p for p in PRESETS if not p.startswith("tiny")}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_shapes_and_param_count(name):
  """Full-size presets through eval_shape: nothing is allocated."""
  c = PRESETS[name]
  model = Transformer(c)
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  # One trace (init runs the forward): tracing an 80-layer model takes seconds.
  (logits, _), variables = jax.eval_shape(
      lambda t: model.init_with_output(jax.random.key(0), t), tokens)
  assert count_params(variables["params"]) == pytest.approx(PUBLISHED_PARAMS[name], rel=5e-3)
  assert logits.shape == (2, 16, c.vocab_size) and logits.dtype == jnp.float32


@pytest.mark.parametrize("equation,shape", [
    ("BTD,DF->BTF", (8, 12)), ("BTD,DNH->BTNH", (8, 3, 4)), ("BTNH,NHD->BTD", (3, 4, 8))])
def test_projections_on_cpu_equal_the_einsum_with_their_gradients(equation, shape):
  """Einsum's CPU path (cpu_linear: a hand-written weight gradient) against
  float64 NumPy: output, input gradient and weight gradient of sum(y * r)."""
  from r1jax.models.layers import Einsum, _projection_out_dims  # pylint: disable=import-outside-toplevel
  assert _projection_out_dims(equation) == len(equation.split("->")[1]) - 2
  assert _projection_out_dims("BTD,DV->BV") is None and _projection_out_dims("BKGH,BKHS->BKGS") is None
  rng = np.random.default_rng(0)
  in_dims = len(equation.split(",")[0]) - 2
  x = rng.standard_normal((2, 5, *shape[:in_dims])).astype(np.float32)
  layer = Einsum(equation, shape, (None,) * len(shape), SMALL, name="proj")
  params = nn.unbox(layer.init(jax.random.key(0), x))
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  r = rng.standard_normal((2, 5, *shape[in_dims:]))
  loss = lambda p, x: jnp.sum(layer.apply(p, x) * r)
  (dp, dx) = jax.grad(loss, argnums=(0, 1))(params, x)
  y = layer.apply(params, x)
  want_y = np.einsum(equation, x.astype(np.float64), kernel)
  out_letters = equation.split("->")[1]
  x_letters, k_letters = equation.split("->")[0].split(",")
  want_dx = np.einsum(f"{out_letters},{k_letters}->{x_letters}", r, kernel)
  want_dk = np.einsum(f"{x_letters},{out_letters}->{k_letters}", x.astype(np.float64), r)
  np.testing.assert_allclose(y, want_y, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, atol=1e-5)
  np.testing.assert_allclose(dp["params"]["kernel"], want_dk, atol=1e-4)


def reference_attention(q_H, k_SH, v_SH):
  """Float64 softmax attention of one query over the keys it may see."""
  s = k_SH @ q_H / math.sqrt(q_H.shape[-1])
  p = np.exp(s - s.max())
  return (p / p.sum()) @ v_SH


def test_attention_impl_is_checked():
  with pytest.raises(ValueError, match="attention_impl"):
    get_preset("tiny", attention_impl="flash")


def test_one_sequence_attention_equals_float64_masked_attention_on_real_positions():
  """attention_impl='cudnn' drops the segment mask for plain causal attention:
  on right-padded one-sequence rows every real position must still get exactly
  the masked result (checked here through XLA, since CPUs have no cuDNN)."""
  from r1jax.models.attention import one_sequence_attention
  B, T, N, K, H = 3, 16, 4, 2, 8
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((B, T, n, H)) for n in (N, K, K))
  lengths = [16, 9, 5]
  out = np.asarray(one_sequence_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                          implementation="xla"))
  for b, n in enumerate(lengths):
    for t in range(n):
      for h in range(N):
        kv = h // (N // K)
        ref = reference_attention(q[b, t, h], k[b, :t + 1, kv], v[b, :t + 1, kv])
        np.testing.assert_allclose(out[b, t, h], ref, rtol=1e-5, atol=1e-5)
  assert np.isfinite(out).all()


def test_sft_refuses_cudnn_attention_on_packed_rows():
  import ml_collections
  from r1jax.errors import ConfigError
  from r1jax.trainers import sft
  model = Transformer(get_preset("tiny", attention_impl="cudnn"))
  config = ml_collections.ConfigDict(dict(train=dict(num_steps=1), seed=0))
  with pytest.raises(ConfigError, match="attention_impl='cudnn'"):
    sft.train(config, "/nonexistent", model=model, dataset=None, mesh=None, tx=None)


@pytest.mark.parametrize("T", [1, 13, 16])
def test_causal_halves_attention_equals_float64_on_packed_and_padded_rows(T):
  """The CPU training path (first half of the queries against the first half
  of the keys) against float64 softmax attention under the segment mask:
  packed segments, padding, odd and tiny T."""
  from r1jax.models.attention import causal_halves_attention
  from r1jax.models.transformer import _training_mask
  B, N, K, H = 2, 4, 2, 8
  rng = np.random.default_rng(T)
  q, k, v = (rng.standard_normal((B, T, n, H)) for n in (N, K, K))
  seg = np.ones((B, T), np.int32)
  seg[0, T // 3:] = 2  # two packed documents
  seg[1, max(1, T - 3):] = 0  # padding at the end
  mask = np.asarray(_training_mask(jnp.asarray(seg)))
  out = np.asarray(causal_halves_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                           jnp.asarray(mask)))
  for b in range(B):
    for t in range(T):
      if seg[b, t] == 0:
        continue
      for h in range(N):
        keys = np.flatnonzero(mask[b, t])
        ref = reference_attention(q[b, t, h], k[b, keys, h // (N // K)], v[b, keys, h // (N // K)])
        np.testing.assert_allclose(out[b, t, h], ref, rtol=1e-5, atol=1e-5)
  assert np.isfinite(out).all()


@pytest.mark.parametrize("products", ["reduce", "einsum"])
def test_decode_attention_equals_float64_with_either_row_products(products, monkeypatch):
  """A decode step's attention (one query per row) over head-major caches,
  without and with a shared prompt prefix, against float64 softmax attention
  over the slots each row may see: the CPU's multiply-and-reduce and the
  GPUs' batched matmuls (attention.ROW_PRODUCTS) both."""
  from r1jax.models import attention
  from r1jax.models.transformer import LayerCache
  monkeypatch.setattr(attention, "ROW_PRODUCTS", products)
  P, G, N, K, H, S, S_pre = 2, 3, 4, 2, 8, 7, 5
  B = P * G
  rng = np.random.default_rng(1)
  q = rng.standard_normal((B, 1, N, H))
  k, v = rng.standard_normal((B, S, K, H)), rng.standard_normal((B, S, K, H))
  pk, pv = rng.standard_normal((P, S_pre, K, H)), rng.standard_normal((P, S_pre, K, H))
  own = rng.random((B, S)) < 0.7
  own[:, 0] = True
  pre = np.ones((P, S_pre), bool)
  pre[0, :2] = False  # a left-padded prompt
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  k_BKHS, v_BKSH = f32(k.transpose(0, 2, 3, 1)), f32(v.transpose(0, 2, 1, 3))
  plain = np.asarray(attention._decode_attention(f32(q), k_BKHS, v_BKSH, jnp.asarray(own)[:, None]))
  prefix = LayerCache(k=f32(pk.transpose(0, 2, 3, 1)), v=f32(pv.transpose(0, 2, 1, 3)))
  shared = np.asarray(attention.shared_prefix_attention(
      f32(q), k_BKHS, v_BKSH, jnp.asarray(own)[:, None], prefix, jnp.asarray(pre)))
  for b in range(B):
    for h in range(N):
      kv = h // (N // K)
      ks, vs = k[b, own[b], kv], v[b, own[b], kv]
      np.testing.assert_allclose(plain[b, 0, h], reference_attention(q[b, 0, h], ks, vs),
                                 rtol=1e-5, atol=1e-5)
      p = b // G
      ks = np.concatenate([pk[p, pre[p], kv], ks])
      vs = np.concatenate([pv[p, pre[p], kv], vs])
      np.testing.assert_allclose(shared[b, 0, h], reference_attention(q[b, 0, h], ks, vs),
                                 rtol=1e-5, atol=1e-5)


def test_rope_tables_are_computed_once_per_position_with_the_same_floats():
  """`rope_sin_cos` (a CPU conditional, so that XLA cannot fuse sin and cos
  into every element of q and k) gives the floats of the plain expression,
  and the rotation equals float64 rotate-half. In the compiled decode-shaped
  rotation of q and k, sin and cos run only on the [B, T, h] tables."""
  from r1jax.models.layers import rope_sin_cos, rotate_half
  B, N, K, H = 16, 4, 2, 8
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((B, 1, N, H)), rng.standard_normal((B, 1, K, H))
  positions = jnp.asarray(rng.integers(0, 4096, (B, 1)), jnp.int32)
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, H, 2) / H))

  sin, cos = jax.jit(rope_sin_cos)(positions, inv_freq)
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  np.testing.assert_array_equal(sin, jax.jit(jnp.sin)(angles))
  np.testing.assert_array_equal(cos, jax.jit(jnp.cos)(angles))

  got = np.asarray(rotate_half(jnp.asarray(q, jnp.float32), *rope_sin_cos(positions, inv_freq)),
                   np.float64)
  a = np.asarray(angles, np.float64)[:, :, None, :]  # the float32 angles, rotated in float64
  x1, x2 = q[..., :H // 2], q[..., H // 2:]
  want = np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def rotate_q_and_k(q, k, positions):
    tables = rope_sin_cos(positions, inv_freq)
    return rotate_half(q, *tables), rotate_half(k, *tables)
  hlo = jax.jit(rotate_q_and_k).lower(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                      positions).compile().as_text()
  # Each computation that evaluates sin or cos holds only [B, T, h] tables,
  # not the per-head rotation (fused in, they run once per element of q or k).
  trig = [c for c in hlo.split("\n\n") if " sine(" in c or " cosine(" in c]
  assert trig and not any(f"f32[{B},1,{n},{H // 2}]" in c for c in trig for n in (N, K)), trig

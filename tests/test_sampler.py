"""Sampler tests: cached decoding against no-cache references, sampling
distributions against the exact truncated distribution, stopping, layout and
compilation caching."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.models.config import get_preset
from r1jax.models.transformer import Transformer
from r1jax.sampling.sampler import (
    SamplingConfig, _generate, _head_logits, _sample, compute_dtype_params, decode_segment_ends,
    sample, truncate_logits)

CONFIG = get_preset(
    "tiny", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    tie_word_embeddings=False, initializer_range=0.1)
MODEL = Transformer(CONFIG)
EOS = 96
PROMPTS = [[5, 17, 42], list(range(1, 8)), [int(t) for t in np.arange(12) * 7 % 95 + 1]]
N_NEW = 8
_FULL_T = 40  # fixed length of the no-cache reference forward (right padded)


def random_params(model, seed=0):
  """Random params filled on the host: compiling the threefry-based `init`
  costs ~10 s on CPU; this costs milliseconds. Norm scales are 1 + noise."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(seed)
  std = model.config.initializer_range

  def fill(path, x):
    noise = rng.normal(0.0, std, x.shape)
    return jnp.asarray(noise + (path[-1].key == "scale"), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])


@pytest.fixture(scope="module")
def params():
  return random_params(MODEL)


@jax.jit
def _full_logits_BTV(params, tokens_BT):
  return MODEL.apply({"params": params}, tokens_BT)[0]


def full_logits(params, seq):
  """No-cache logits [len(seq), V] of one unpadded sequence (right padding is
  invisible to a causal model, so one compiled shape serves every length)."""
  tokens = np.zeros((1, _FULL_T), np.int32)
  tokens[0, :len(seq)] = seq
  return np.asarray(_full_logits_BTV(params, jnp.asarray(tokens)))[0, :len(seq)]


def greedy_reference(params, prompt, n):
  """Argmax of a full forward re-run at every step; never stops."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(full_logits(params, seq)[-1])))
  return seq[len(prompt):]


def run(params, prompts, config, rng=0, eos_id=EOS, **kw):
  out = sample(MODEL, params, prompts, jax.random.key(rng), config, eos_id=eos_id, **kw)
  return jax.tree.map(np.asarray, out)


GREEDY = SamplingConfig(max_new_tokens=N_NEW, temperature=0.0, prompt_bucket=8)
# Temperature, top_k, top_p and eos/stop ids are traced: tests that vary only
# those (and stay in "truncated" mode) share this compiled program.
NUCLEUS = SamplingConfig(max_new_tokens=N_NEW, temperature=0.7, top_p=0.9, num_samples=3,
                         prompt_bucket=8)


def test_greedy_equals_no_cache_argmax_loop(params):
  refs = [greedy_reference(params, p, N_NEW) for p in PROMPTS]
  assert EOS not in sum(refs, []), "pick another EOS: the reference never stops"
  out = run(params, PROMPTS, GREEDY)
  np.testing.assert_array_equal(out.tokens, np.array(refs))
  np.testing.assert_array_equal(out.lengths, N_NEW)
  assert not out.finished.any()


def test_logprobs_are_tempered_untruncated_policy(params):
  """logprobs = log_softmax(logits / T) of a full forward over prompt + completion."""
  G, temp = NUCLEUS.num_samples, NUCLEUS.temperature
  out = run(params, PROMPTS, NUCLEUS, rng=1)
  assert out.tokens.shape == (len(PROMPTS) * G, N_NEW)
  for row in range(len(PROMPTS) * G):
    prompt, n = PROMPTS[row // G], out.lengths[row]  # prompt-major rows
    completion = list(out.tokens[row, :n])
    logits = full_logits(params, prompt + completion)[len(prompt) - 1:-1]
    logp = jax.nn.log_softmax(logits / temp, axis=-1)
    expected = np.take_along_axis(np.asarray(logp), np.array(completion)[:, None], 1)[:, 0]
    np.testing.assert_allclose(out.logprobs[row, :n], expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.logprobs[row, n:], 0.0)


@pytest.mark.parametrize("top_k,top_p,kept", [
    (0, 1.0, 5), (0, 0.65, 2), (0, 0.75, 3), (0, 1e-6, 1), (3, 1.0, 3), (1, 1.0, 1),
    # top-p over the top-4 renormalised: 0.5/0.95 + 0.2/0.95 = 0.737 < 0.8.
    (4, 0.8, 3), (4, 0.7, 2)])
def test_truncate_logits_keeps_the_expected_set(top_k, top_p, kept):
  probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])  # order 1, 3, 4, 2, 0
  out = np.asarray(truncate_logits(jnp.log(jnp.asarray(probs[None], jnp.float32)),
                                   jnp.int32(top_k), jnp.float32(top_p)))[0]
  expected = np.isin(np.arange(5), [1, 3, 4, 2, 0][:kept])
  np.testing.assert_array_equal(np.isfinite(out), expected)
  np.testing.assert_allclose(out[expected], np.log(probs[expected]), rtol=1e-6)


@pytest.mark.parametrize("config", [
    dataclasses.replace(NUCLEUS, temperature=1.0, top_k=1, top_p=1.0),
    dataclasses.replace(NUCLEUS, temperature=1.0, top_p=1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_truncation_to_one_token_is_greedy(params, config):
  greedy = run(params, PROMPTS, GREEDY)
  out = run(params, PROMPTS, config, rng=3)
  np.testing.assert_array_equal(out.tokens, np.repeat(greedy.tokens, config.num_samples, 0))


def test_stops_at_eos_and_stop_tokens(params):
  refs = np.array([greedy_reference(params, p, N_NEW) for p in PROMPTS])
  eos, stop = int(refs[0, 3]), int(refs[1, 4])
  config = dataclasses.replace(GREEDY, stop_token_ids=(stop,))
  out = run(params, PROMPTS, config, eos_id=eos, pad_id=0)
  for row, ref in enumerate(refs):
    hits = np.flatnonzero(np.isin(ref, [eos, stop]))
    n = hits[0] + 1 if len(hits) else N_NEW
    assert out.lengths[row] == n
    assert out.finished[row] == bool(len(hits))
    np.testing.assert_array_equal(out.tokens[row, :n], ref[:n])  # stop token kept
    np.testing.assert_array_equal(out.tokens[row, n:], 0)
    np.testing.assert_array_equal(out.logprobs[row, n:], 0.0)
  # The fixed seed gives rows stopping at eos, at the stop token, and not at all.
  assert len(set(out.lengths.tolist())) == 3
  assert out.finished.any() and not out.finished.all()


def _always_eos_params(params, eos):
  """Zeroes every block's output so the residual is the (constant) embedding,
  and points the head at `eos`: logit(eos) = D, every other logit 0."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x)
      if any(getattr(k, "key", None) in ("o_proj", "down_proj") for k in path) else x, params)
  params = dict(params)
  params["embed_tokens"] = {"embedding": jnp.ones_like(params["embed_tokens"]["embedding"])}
  params["lm_head"] = {"kernel": jnp.zeros_like(params["lm_head"]["kernel"]).at[:, eos].set(1.0)}
  return params


def test_loop_exits_when_every_row_finished(params):
  config = dataclasses.replace(NUCLEUS, temperature=1.0, top_p=0.99)
  out, steps = _sample(MODEL, _always_eos_params(params, EOS), PROMPTS, jax.random.key(0),
                       config, eos_id=EOS, pad_id=0, max_cache_length=None)
  out = jax.tree.map(np.asarray, out)
  np.testing.assert_array_equal(out.lengths, 1)
  assert out.finished.all()
  np.testing.assert_array_equal(out.tokens[:, 0], EOS)
  np.testing.assert_array_equal(out.tokens[:, 1:], 0)
  np.testing.assert_array_equal(out.logprobs[:, 1:], 0.0)
  assert int(steps) == 1  # not max_new_tokens: the while_loop stopped early


SAMPLED = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, num_samples=4, prompt_bucket=8)


def test_samples_per_prompt_differ_and_reproduce(params):
  G = SAMPLED.num_samples
  a, b = run(params, PROMPTS, SAMPLED, rng=7), run(params, PROMPTS, SAMPLED, rng=7)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  for p in range(len(PROMPTS)):
    rows = {tuple(r) for r in a.tokens[p * G:(p + 1) * G]}
    assert len(rows) == G, f"prompt {p}: samples are not distinct"
  c = run(params, PROMPTS, SAMPLED, rng=8)
  assert (a.tokens != c.tokens).any()


def test_prompt_results_independent_of_batch_layout(params):
  """Keys are folded per (prompt index, sample index, step): changing the other
  prompts (and so the padding) leaves prompt 0's samples unchanged."""
  G = SAMPLED.num_samples
  a = run(params, PROMPTS, SAMPLED, rng=7)
  other = [PROMPTS[0], [3, 1, 4, 1, 5], list(range(20, 32))]
  b = run(params, other, SAMPLED, rng=7)
  np.testing.assert_array_equal(a.tokens[:G], b.tokens[:G])
  np.testing.assert_allclose(a.logprobs[:G], b.logprobs[:G], atol=1e-5)
  assert (a.tokens[G:2 * G] != b.tokens[G:2 * G]).any()


@pytest.mark.parametrize("temp,top_k,top_p", [(0.7, 0, 0.8), (1.3, 5, 1.0)])
def test_first_token_frequencies_match_truncated_distribution(params, temp, top_k, top_p):
  n = 4000
  # A sharper head so the nucleus is a handful of tokens, not most of the vocabulary.
  sharp = dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 1.75})
  prompt = PROMPTS[1]
  logits = full_logits(sharp, prompt)[-1].astype(np.float64) / temp
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros_like(probs, bool)
  if top_k:
    keep[order[:top_k]] = True
  else:
    before = np.cumsum(probs[order]) - probs[order]
    keep[order[before < top_p]] = True
  expected = np.where(keep, probs, 0.0)
  expected /= expected.sum()
  assert 3 <= keep.sum() <= 30, f"degenerate test distribution: {keep.sum()} tokens kept"

  config = SamplingConfig(max_new_tokens=1, temperature=temp, top_k=top_k, top_p=top_p,
                          num_samples=n, prompt_bucket=8)
  out = run(sharp, [prompt], config, rng=11)
  counts = np.bincount(out.tokens[:, 0], minlength=CONFIG.vocab_size)
  assert counts[~keep].sum() == 0, "sampled a token outside the top-k / nucleus"
  freq = counts / n
  tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
  np.testing.assert_array_less(np.abs(freq - expected), tol)
  # logprobs are the untruncated tempered policy, not the renormalised one.
  np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[out.tokens[:, 0]]), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_last_position_head_matches_model_logits(tied):
  """The sampler projects only the last prefill position with its own copy of
  the output head; it must match the model's."""
  model = Transformer(CONFIG.replace(tie_word_embeddings=tied))
  params = random_params(model)
  tokens = jnp.asarray([PROMPTS[2]], jnp.int32)

  @jax.jit
  def both(params):
    logits, _ = model.apply({"params": params}, tokens)
    hidden, _ = model.apply({"params": params}, tokens, return_hidden=True)
    return logits[:, -1], _head_logits(model, params, hidden[:, -1])

  want, got = both(params)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_prompt_too_long_raises_naming_the_prompt(params):
  config = SamplingConfig(max_new_tokens=8, prompt_bucket=8)
  with pytest.raises(ValueError, match=r"prompt 1 has 30 tokens.*38.*max_cache_length=32"):
    run(params, [[1, 2], [3] * 30], config, max_cache_length=32)
  with pytest.raises(ValueError, match=r"prompt 2 .*max_position_embeddings=128"):
    run(params, [[1], [2], [3] * 125], config)
  with pytest.raises(ValueError, match=r"prompt 1 is empty"):
    run(params, [[1], []], config)
  with pytest.raises(ValueError, match=r"prompt 0 has token id 97"):
    run(params, [[1, 97]], config)


def test_cache_length_smaller_than_bucket_still_fits(params):
  """A caller-given cache shorter than bucket + max_new_tokens shrinks the bucket
  (here to 16, GREEDY's bucket: the same shapes, so no extra compile)."""
  config = dataclasses.replace(GREEDY, prompt_bucket=32)
  out = run(params, PROMPTS, config, max_cache_length=16 + N_NEW)
  np.testing.assert_array_equal(out.tokens, run(params, PROMPTS, GREEDY).tokens)


def test_second_call_with_same_shapes_does_not_recompile(params):
  run(params, PROMPTS, SAMPLED, rng=0)
  compiled = _generate._cache_size()
  # Other prompts in the same length bucket, another key, other traced knobs.
  run(params, [[9, 9], [8] * 10, [7] * 16], SAMPLED, rng=1)
  run(params, PROMPTS, dataclasses.replace(SAMPLED, temperature=0.5, stop_token_ids=(3, 4)),
      rng=2, eos_id=5, pad_id=1)
  assert _generate._cache_size() == compiled
  run(params, PROMPTS + [[1] * 20], SAMPLED, rng=0)  # a new bucket does compile
  assert _generate._cache_size() == compiled + 1


# ---------------------------------------------------------------------------
# Speed features (issue 10): truncation without a sort, the shared prefill,
# early exit.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("V,scale", [(97, 1.0), (1000, 4.0), (5000, 0.3)])
def test_sort_free_truncation_keeps_the_sorted_set(V, scale):
  rng = np.random.default_rng(V)
  logits = jnp.asarray(rng.normal(0.0, scale, (32, V)), jnp.float32)
  logits = logits.at[:4, :5].set(2.0).at[4:8].set(0.0)  # ties, and all-equal rows
  f = jax.jit(lambda x, k, p, method: truncate_logits(x, k, p, method=method),
              static_argnames="method")
  for k, p in [(0, 0.9), (1, 1.0), (20, 1.0), (20, 0.5), (0, 0.05), (V + 5, 0.999)]:
    want = np.isfinite(np.asarray(f(logits, k, p, "sort")))
    got = np.isfinite(np.asarray(f(logits, k, p, "search")))
    np.testing.assert_array_equal(got, want, err_msg=f"top_k={k} top_p={p}")
    assert want.sum(-1).min() >= 1


def _prefill_flops(params, rows, P=32):
  from r1jax.sampling.sampler import prefill
  tokens = jnp.ones((rows, P), jnp.int32)
  lengths = jnp.full((rows,), P, jnp.int32)
  fn = jax.jit(lambda v, t, l: prefill(MODEL, v, t, l, P + 8))
  cost = fn.lower({"params": params}, tokens, lengths).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_shared_prefill_cuts_prefill_flops_by_g_and_samples_the_same(params):
  G = 16
  shared = dataclasses.replace(SAMPLED, num_samples=G, max_new_tokens=6)
  unshared = dataclasses.replace(shared, share_prefix=False)
  a, b = run(params, PROMPTS, shared, rng=5), run(params, PROMPTS, unshared, rng=5)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  # XLA's own FLOP count of the prefill program: B prompts vs B * G copies.
  B = len(PROMPTS)
  ratio = _prefill_flops(params, B * G) / _prefill_flops(params, B)
  assert ratio >= 10, ratio


def test_decode_segments_sample_the_same(params):
  """Decoding in segments over a growing cache (early steps skip the empty
  tail) samples what one loop over the whole cache samples."""
  assert decode_segment_ends(128, 4) == [32, 64, 96, 127]  # multiples of 8 where there is room
  assert decode_segment_ends(11, 4) == [3, 6, 9, 10]
  assert decode_segment_ends(2, 4) == [1] and decode_segment_ends(1, 4) == []
  one = dataclasses.replace(SAMPLED, max_new_tokens=11, decode_segments=1)
  for share in (True, False):
    a = run(params, PROMPTS, dataclasses.replace(one, share_prefix=share), rng=3)
    b = run(params, PROMPTS, dataclasses.replace(one, share_prefix=share, decode_segments=4),
            rng=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_moe_model_samples_the_same_with_a_shared_prefix():
  """DeepSeek-V3 (MLA's latent cache) through the sampler: the shared prompt
  prefix samples what G prefilled copies sample."""
  from tests.test_deepseek_v3 import SMALL, random_variables
  from r1jax.models.deepseek_v3 import DeepseekV3
  model = DeepseekV3(SMALL)
  variables = random_variables(model, seed=2, bias_scale=0.1, std=0.3)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  config = dataclasses.replace(SAMPLED, max_new_tokens=6)
  prompts = [[t % (SMALL.vocab_size - 1) for t in p] for p in PROMPTS]
  outs = [jax.tree.map(np.asarray, sample(
      model, params, prompts, jax.random.key(1), dataclasses.replace(config, share_prefix=s),
      eos_id=SMALL.vocab_size - 1, model_state=state)) for s in (True, False)]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
  assert len(np.unique(outs[0].tokens[:4], axis=0)) > 1  # the G samples differ


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_params_cast_once_to_the_compute_dtype_change_nothing(family):
  """bf16 activations over float32 params: the decode loop's params, cast
  once (compute_dtype_params), give bit-identical logits. Casting the norm
  scales or the MoE router too would change them (checked, so the test can
  fail)."""
  from r1jax.models import moe
  if family == "dense":
    model = Transformer(dataclasses.replace(CONFIG, dtype="bfloat16"))
    variables = {"params": random_params(model, seed=3)}
  else:
    from tests.test_deepseek_v3 import SMALL, random_variables
    from r1jax.models.deepseek_v3 import DeepseekV3
    model = DeepseekV3(dataclasses.replace(SMALL, dtype="bfloat16"))
    variables = random_variables(model, seed=2, bias_scale=0.1, std=0.3)
  tokens = jnp.asarray([PROMPTS[2]]) % (model.config.vocab_size - 1)
  logits = lambda params: np.asarray(model.apply({**variables, "params": params}, tokens)[0])
  params = variables["params"]
  cast = compute_dtype_params(model.config, params)
  want = logits(params)
  assert np.isfinite(want).all()
  assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.float32),
                                                      jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(logits(cast), want)
  also = ["scale"] + ([moe.ROUTER] if family == "moe" else [])
  for name in also:
    over = jax.tree_util.tree_map_with_path(
        lambda path, x, c: x.astype(jnp.bfloat16)
        if name in [getattr(k, "key", None) for k in path] else c, params, cast)
    assert np.abs(logits(over) - want).max() > 1e-3, name


def test_finished_rows_stop_the_loop_early_in_wall_time(params):
  """All rows stop after 5 tokens vs the same batch forced to 512 tokens."""
  import time
  prompt, N = PROMPTS[1], 512
  long_model = Transformer(dataclasses.replace(CONFIG, max_position_embeddings=1024))  # same params
  run = lambda params, prompts, config, eos_id: jax.tree.map(np.asarray, sample(
      long_model, params, prompts, jax.random.key(0), config, eos_id=eos_id))
  greedy = SamplingConfig(max_new_tokens=N, temperature=0.0, num_samples=1, prompt_bucket=8)
  first = run(params, [prompt], dataclasses.replace(greedy, max_new_tokens=8), eos_id=0)
  stop = int(first.tokens[0, 4])
  assert stop not in first.tokens[0, :4].tolist()  # the 5th token is the first of its kind
  batch = [prompt] * 32
  timed = {}
  for name, cfg in [("stops", dataclasses.replace(greedy, stop_token_ids=(stop,))),
                    ("forced", greedy)]:
    run(params, batch, cfg, eos_id=0)  # compile
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      out = run(params, batch, cfg, eos_id=0)
      best = min(best, time.perf_counter() - t0)
    timed[name] = (best, out.lengths)
  assert (timed["stops"][1] == 5).all() and (timed["forced"][1] == N).all()
  assert timed["forced"][0] >= 10 * timed["stops"][0], timed

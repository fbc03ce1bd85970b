"""Batched KV-cache sampler: one prefill per prompt, then a jitted decode loop.

`sample(model, params, prompts, rng, config, eos_id=...)` left-pads the prompts
to a bucketed length, prefills them once (batch B) and decodes B*G rows
(prompt-major: row = prompt * G + sample). The prompts' cache is shared, not
repeated: each row attends to its prompt's slots (read once per prompt per
step, `SharedPrefix`) and then to its own cache of new tokens. Decoding runs
in `jax.lax.while_loop`s that stop when every row has hit eos / a stop token
or `max_new_tokens` is reached; `decode_segments` loops, each over a cache
only as long as its steps need. Everything after the host-side padding runs in a
single jitted function, compiled once per model, shapes and structural knobs
(see `sample`), so repeated calls with prompts in the same length bucket reuse it.

Randomness: row (b, g) draws from `fold_in(fold_in(fold_in(rng, b), g), step)`,
so a prompt's samples depend only on the key, its index and the model, not on
the other prompts in the batch or on the padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.errors import UserError
from r1jax.models.moe import ROUTER
from r1jax.models.transformer import KVCache, SharedPrefix, Transformer, output_weights_DV


class SamplingError(UserError, ValueError):
  """Bad sampling input: a prompt that does not fit, an id outside the vocabulary."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. Only the knobs that change the program are static under jit."""

  max_new_tokens: int = 128  # tokens generated per row, including the stop token
  temperature: float = 1.0  # softmax temperature; 0.0 means greedy (argmax)
  top_p: float = 1.0  # nucleus: smallest set with cumulative prob >= top_p; 1.0 = off
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  num_samples: int = 1  # G completions per prompt
  stop_token_ids: tuple[int, ...] = ()  # stop besides eos (kept in the output), e.g. "</answer>"
  prompt_bucket: int = 32  # pad prompt length to a multiple of this: few shapes, few compiles
  # Prefill each prompt once and share its cache across its G samples; False
  # prefills every copy (what the PyTorch anchors do; kept to measure against).
  share_prefix: bool = True
  # Decode in this many loops, each over a cache only as long as its steps
  # need (grown between loops): early steps do not read the cache's empty
  # tail. One more compiled copy of the decode step per segment; 1 = one loop
  # over the whole cache.
  decode_segments: int = 4

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise SamplingError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise SamplingError(f"temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise SamplingError(f"top_k={self.top_k} must be >= 0")
    if self.num_samples < 1:
      raise SamplingError(f"num_samples={self.num_samples} must be >= 1")
    if self.prompt_bucket < 1:
      raise SamplingError(f"prompt_bucket={self.prompt_bucket} must be >= 1")
    if self.decode_segments < 1:
      raise SamplingError(f"decode_segments={self.decode_segments} must be >= 1")
    # Lists (e.g. from an ml_collections config) would make the config unhashable.
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@flax.struct.dataclass
class SampleOutput:
  """Completions, rows prompt-major (row = prompt_index * G + sample_index).

  `logprobs` are log-probabilities under softmax(logits / temperature) WITHOUT
  the top-k / top-p truncation (plain log_softmax(logits) when greedy): the
  behaviour policy pi_old that GRPO's importance ratio divides by, consistent
  with a trainer that divides its logits by the same temperature.
  """

  tokens: jax.Array  # [B*G, max_new_tokens] int32, pad_id after the end
  logprobs: jax.Array  # [B*G, max_new_tokens] float32, 0 after the end
  lengths: jax.Array  # [B*G] int32, generated tokens including the stop/eos token
  finished: jax.Array  # [B*G] bool, hit eos/stop within max_new_tokens


def sample(model: Transformer, params, prompts: Sequence[Sequence[int]], rng: jax.Array,
           config: SamplingConfig, *, eos_id: int, pad_id: int = 0,
           max_cache_length: Optional[int] = None,
           model_state: Optional[dict] = None) -> SampleOutput:
  """Samples `config.num_samples` completions for each prompt.

  Args:
    model: the decoder (Transformer or DeepseekV3); its `config` sizes the
      cache and bounds positions, its `init_cache` builds the cache.
    params: the model's (unboxed) params pytree.
    prompts: B token-id lists, each non-empty.
    rng: a PRNG key; see the module docstring for how it is folded.
    config: sampling knobs. One compile per model, shapes (prompt bucket,
      max_new_tokens, num_samples, cache length) and mode (greedy, plain
      sampling, or truncated by top-k/top-p); temperature, top_k, top_p and
      eos/stop/pad ids are traced, so sweeping them does not recompile.
    eos_id: end-of-sequence id; generation of a row stops after it.
    pad_id: id written after a row's end (and used to left-pad prompts).
    max_cache_length: KV-cache slots; default bucketed prompt length + max_new_tokens.
    model_state: the model's non-param collections (TrainState.model_state:
      the MoE router biases); None or {} for the dense model.
  Returns:
    A SampleOutput of device arrays with B * num_samples rows.
  Raises:
    SamplingError (a ValueError): an empty prompt, a token id outside the vocabulary, or a prompt
      that with max_new_tokens does not fit the cache or the model's positions.
  """
  return _sample(model, params, prompts, rng, config, eos_id=eos_id, pad_id=pad_id,
                 max_cache_length=max_cache_length, model_state=model_state)[0]


def _sample(model, params, prompts, rng, config, *, eos_id, pad_id, max_cache_length,
            model_state=None):
  """`sample`, also returning the number of decode steps the loop ran."""
  tokens_BP, lengths_B, max_cache_length = _pad_prompts(
      model, prompts, config, eos_id=eos_id, pad_id=pad_id, max_cache_length=max_cache_length)
  stop_ids = (eos_id,) + config.stop_token_ids
  # Pad the id list with eos to a multiple of 8 so its length rarely changes the shape.
  stop_ids += (eos_id,) * (-len(stop_ids) % 8)
  return _generate(
      model, params, tokens_BP, lengths_B, rng, np.float32(config.temperature),
      np.int32(config.top_k), np.float32(config.top_p), np.asarray(stop_ids, np.int32),
      np.int32(pad_id), max_new_tokens=config.max_new_tokens,
      num_samples=config.num_samples, greedy=config.temperature == 0.0,
      truncate=config.top_k > 0 or config.top_p < 1.0, max_cache_length=max_cache_length,
      share_prefix=config.share_prefix, decode_segments=config.decode_segments,
      model_state=model_state or {})


def _pad_prompts(model, prompts, config, *, eos_id, pad_id, max_cache_length):
  """Validates prompts and left-pads them to a bucketed length (host side)."""
  mc = model.config
  vocab, max_pos, N = mc.vocab_size, mc.max_position_embeddings, config.max_new_tokens
  for name, tok in [("eos_id", eos_id), ("pad_id", pad_id)] + [
      ("stop_token_ids", t) for t in config.stop_token_ids]:
    if not 0 <= tok < vocab:
      raise SamplingError(f"{name}={tok} is outside the vocabulary [0, {vocab})")
  if not len(prompts):
    raise SamplingError("no prompts to sample from")
  prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
  max_len = max(len(p) for p in prompts)
  bucketed = -(-max_len // config.prompt_bucket) * config.prompt_bucket
  if max_cache_length is None:
    max_cache_length = bucketed + N
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise SamplingError(f"prompt {i} is empty")
    if len(p) + N > max_cache_length:
      raise SamplingError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={N} it needs "
          f"{len(p) + N} cache slots > max_cache_length={max_cache_length}")
    if len(p) + N > max_pos:
      raise SamplingError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={N} it reaches position "
          f"{len(p) + N - 1} >= max_position_embeddings={max_pos}")
    bad = (p < 0) | (p >= vocab)
    if bad.any():
      j = int(np.argmax(bad))
      raise SamplingError(f"prompt {i} has token id {int(p[j])} at index {j}, outside "
                       f"the vocabulary [0, {vocab})")
  # The bucket may not fit a caller-given cache; shrink it (still >= max_len).
  P = min(bucketed, max_cache_length - N)
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens_BP[i, P - len(p):] = p
  lengths_B = np.array([len(p) for p in prompts], np.int32)
  return tokens_BP, lengths_B, max_cache_length


def prefill(model: Transformer, variables, tokens_BP: jax.Array, lengths_B: jax.Array,
            max_cache_length: int):
  """The prompts through the model into a fresh cache: (last-position logits [B, V], cache).

  Left padding puts every prompt's last token in slot P-1; positions restart
  at 0 on each prompt's first real token.
  """
  B, P = tokens_BP.shape
  valid_BP = jnp.arange(P)[None, :] >= (P - lengths_B)[:, None]
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  cache = model.init_cache(B, max_cache_length)
  hidden_BPD, cache = model.apply(
      variables, tokens_BP, positions_BP, valid_BP.astype(jnp.int32), cache,
      return_hidden=True)
  # Project only the last position: full prefill logits would be [B, P, V].
  return _head_logits(model, variables["params"], hidden_BPD[:, -1]), cache


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "num_samples", "greedy", "truncate", "max_cache_length",
    "share_prefix", "decode_segments"))
def _generate(model: Transformer, params, tokens_BP: jax.Array, lengths_B: jax.Array,
              rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
              stop_ids: jax.Array, pad_id: jax.Array, *, max_new_tokens: int,
              num_samples: int, greedy: bool, truncate: bool,
              max_cache_length: int, share_prefix: bool = True, decode_segments: int = 4,
              model_state=None) -> tuple[SampleOutput, jax.Array]:
  """Prefill + decode loop. Returns the output and the number of decode steps run."""
  B, P = tokens_BP.shape
  G, N = num_samples, max_new_tokens
  variables = {"params": compute_dtype_params(model.config, params), **(model_state or {})}
  ends = decode_segment_ends(N, decode_segments)
  rep = lambda x: jnp.repeat(x, G, axis=0)  # prompt-major: row = prompt * G + sample
  if share_prefix:
    # Prefill once per prompt into a cache of its P slots, which the G samples
    # share (SharedPrefix: read once per prompt, never repeated); each row
    # decodes into its own cache of the new tokens' slots.
    logits_BV, prompt_cache = prefill(model, variables, tokens_BP, lengths_B, P)
    own_slots = max_cache_length - P
    cache = model.init_cache(B * G, ends[0] if len(ends) > 1 else own_slots).replace(
        prefix=SharedPrefix(layers=prompt_cache.layers, valid_BS=prompt_cache.valid_BS))
    logits_BV = rep(logits_BV)
  else:  # every copy prefilled (G times the prefill FLOPs), prompt in each row's cache
    own_slots = max_cache_length
    logits_BV, cache = prefill(model, variables, rep(tokens_BP), rep(lengths_B),
                               P + ends[0] if len(ends) > 1 else own_slots)
  lengths_B = rep(lengths_B)  # from here on B means the B*G decode rows
  keys_B = jax.vmap(lambda b, g: jax.random.fold_in(jax.random.fold_in(rng, b), g))(
      jnp.arange(B * G) // G, jnp.arange(B * G) % G)

  def pick(step, logits_BV, done_B):
    """Samples token `step` of every row; rows already done get pad / 0."""
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
    token_B, logprob_B = _sample_tokens(
        logits_BV, step_keys_B, temperature, top_k, top_p, greedy=greedy, truncate=truncate)
    token_B = jnp.where(done_B, pad_id, token_B)
    logprob_B = jnp.where(done_B, 0.0, logprob_B)
    return token_B, logprob_B

  done_B = jnp.zeros((B * G,), bool)
  token_B, logprob_B = pick(0, logits_BV, done_B)
  tokens_BN = jnp.full((B * G, N), pad_id, jnp.int32).at[:, 0].set(token_B)
  logprobs_BN = jnp.zeros((B * G, N), jnp.float32).at[:, 0].set(logprob_B)
  done_B = jnp.isin(token_B, stop_ids)
  out_lengths_B = jnp.ones((B * G,), jnp.int32)

  def cond(last_step):
    def go_on(state):
      step, _, _, _, done_B, _ = state
      return (step <= last_step) & ~jnp.all(done_B)
    return go_on

  def body(state):
    step, cache, tokens_BN, logprobs_BN, done_B, out_lengths_B = state
    # Feed token step-1 at the row's own next position (its length so far).
    prev_B1 = jax.lax.dynamic_slice_in_dim(tokens_BN, step - 1, 1, axis=1)
    positions_B1 = (lengths_B + step - 1)[:, None]
    logits_B1V, cache = model.apply(
        variables, prev_B1, positions_B1, jnp.ones_like(prev_B1), cache)
    token_B, logprob_B = pick(step, logits_B1V[:, 0], done_B)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, token_B[:, None], step, axis=1)
    logprobs_BN = jax.lax.dynamic_update_slice_in_dim(
        logprobs_BN, logprob_B[:, None], step, axis=1)
    out_lengths_B = out_lengths_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.isin(token_B, stop_ids)
    return step + 1, cache, tokens_BN, logprobs_BN, done_B, out_lengths_B

  # Step s writes the row's own slot s - 1 (P + s - 1 with the prompt in the
  # row's cache) and reads the slots up to it: a segment ending at step s runs
  # on a cache of just those slots, grown for the next one.
  state = (jnp.ones((), jnp.int32), cache, tokens_BN, logprobs_BN, done_B, out_lengths_B)
  for last_step in ends:
    length = own_slots if last_step == N - 1 else last_step + (0 if share_prefix else P)
    state = (state[0], _grow_cache(model, state[1], length), *state[2:])
    state = jax.lax.while_loop(cond(last_step), body, state)
  steps, _, tokens_BN, logprobs_BN, done_B, out_lengths_B = state
  out = SampleOutput(tokens=tokens_BN, logprobs=logprobs_BN, lengths=out_lengths_B,
                     finished=done_B)
  return out, steps


def compute_dtype_params(config, params):
  """`params` with every leaf the model casts to `config.dtype` before use
  already cast, so that the decode loop reads bf16 weights instead of
  converting float32 ones at every step (XLA keeps the converts inside the
  loop). Exact: the model's own cast is then a no-op. Norm scales (applied in
  float32) and the MoE router (routes in float32) keep `param_dtype`."""
  dtype = jnp.dtype(config.dtype)
  if jnp.dtype(config.param_dtype) == dtype:
    return params

  def cast(path, x):
    names = [getattr(k, "key", None) for k in path]
    keep = names[-1] == "scale" or ROUTER in names[:-1]
    return x if keep or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def _grow_cache(model, cache: KVCache, length: int) -> KVCache:
  """`cache` with `length` slots: its slots first, empty ones after (every
  array of either family's cache starts with them at index 0); the shared
  prefix is kept as it is."""
  if cache.max_length == length:
    return cache
  empty = model.init_cache(cache.valid_BS.shape[0], length,
                           dtype=jax.tree.leaves(cache.layers)[0].dtype)
  grow = lambda new, old: jax.lax.dynamic_update_slice(new, old, (0,) * old.ndim)
  return cache.replace(layers=jax.tree.map(grow, empty.layers, cache.layers),
                       valid_BS=grow(empty.valid_BS, cache.valid_BS))


def decode_segment_ends(max_new_tokens: int, segments: int) -> list[int]:
  """The last decode step of each segment: steps 1..max_new_tokens-1 cut into
  at most `segments` runs of equal length (a multiple of 8 where there is room)."""
  steps = max_new_tokens - 1
  if steps < 1:
    return []
  size = -(-steps // segments)
  if size > 8:
    size = -(-size // 8) * 8
  return sorted({min(end, steps) for end in range(size, steps + size, size)})


def _head_logits(model: Transformer, params, hidden_BD: jax.Array) -> jax.Array:
  """The model's output head on final normed hidden states, in float32."""
  c = model.config
  w_DV = output_weights_DV(c, params).astype(c.dtype)
  logits_BV = jnp.einsum("BD,DV->BV", hidden_BD.astype(c.dtype), w_DV)
  return logits_BV.astype(jnp.float32)


def _sample_tokens(logits_BV: jax.Array, keys_B: jax.Array, temperature: jax.Array,
                   top_k: jax.Array, top_p: jax.Array, *, greedy: bool,
                   truncate: bool) -> tuple[jax.Array, jax.Array]:
  """One token per row and its log-prob under the untruncated tempered policy."""
  logits_BV = logits_BV.astype(jnp.float32)
  if greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  else:
    scaled_BV = logits_BV / temperature
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    if truncate:
      scaled_BV = truncate_logits(scaled_BV, top_k, top_p)
    # Inverse CDF with one uniform per row (its own key: a row's draw is
    # independent of the batch). Gumbel-max drew V numbers per row and step:
    # 2.7x slower at V=1024 and 3.8x at 151,936 on CPU (V threefry draws).
    u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)
    cdf_BV = jnp.cumsum(jax.nn.softmax(scaled_BV, axis=-1), axis=-1)
    # Token i is drawn when cdf[i-1] <= u * total < cdf[i]: count the cdf
    # entries <= u * total (truncated tokens add nothing, so are never drawn).
    below_B = jnp.sum(cdf_BV <= (u_B * cdf_BV[:, -1])[:, None], axis=-1)
    token_B = jnp.minimum(below_B, logits_BV.shape[-1] - 1).astype(jnp.int32)
  logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
  return token_B, logprob_B


# From this vocabulary size on, truncation searches its thresholds instead of
# sorting every row every step (benchmarks/sampler.py times both).
SORT_FREE_VOCAB = 16384


def truncate_logits(logits_BV: jax.Array, top_k: jax.Array | int = 0,
                    top_p: jax.Array | float = 1.0, *, method: str = "auto") -> jax.Array:
  """Sets logits outside the top-k, then outside the nucleus, to -inf.

  `method`: "sort" (one sort of the row serves both), "search" (no sort: each
  threshold found by bisection over the float's bits, 32 passes of O(V)), or
  "auto" (search from SORT_FREE_VOCAB tokens, except on GPUs: on an H100 the
  sort of 128 x 151,936 logits took 2 ms and the search 4 ms,
  benchmarks/sampler.py). Both keep the same set.

  top_k (0 = off) and top_p (1.0 = off) may be traced scalars: one sort serves
  both. Top-p is applied to the top-k-renormalised distribution (the Hugging
  Face warper order); it keeps the smallest set of most likely tokens whose
  cumulative probability is >= top_p, and always the most likely token.
  Tokens tied with the last kept one are kept too.
  """
  V = logits_BV.shape[-1]
  if method == "search" or (method == "auto" and V >= SORT_FREE_VOCAB
                            and jax.default_backend() != "gpu"):
    return _truncate_by_search(logits_BV, top_k, top_p)
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k - 1, 0, V - 1), axis=-1)[:, None]
  kth_B1 = jnp.where(top_k > 0, kth_B1, -jnp.inf)
  sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
  sorted_probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token while the mass strictly before it is < top_p (top_p = 1 keeps
  # all of the top-k: a float32 cumsum may reach 1 before the tail).
  before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
  keep_BV = ((before_BV < top_p) | (top_p >= 1.0)) & (sorted_BV >= kth_B1)
  keep_BV = keep_BV.at[:, 0].set(True)
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (the radix-sort key)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (i >> 31) == 1
  return jnp.where(negative, ~i, i | jnp.uint32(0x80000000))


def _largest_threshold(keys_BV: jax.Array, holds) -> jax.Array:
  """Per row, the largest key t (among [min, max] of the row) with holds(t)
  true, for a `holds` that is true at the row's minimum and monotone (once
  false, false for every larger t). 32 bisection steps: exact for uint32."""
  lo = jnp.min(keys_BV, axis=-1)
  hi = jnp.max(keys_BV, axis=-1)

  def step(_, bounds):
    lo, hi = bounds
    d = hi - lo
    mid = lo + (d >> 1) + (d & 1)  # ceil((lo + hi) / 2), no overflow
    ok = holds(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - jnp.where(d > 0, 1, 0).astype(d.dtype))

  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return lo


def _truncate_by_search(logits_BV: jax.Array, top_k, top_p) -> jax.Array:
  """truncate_logits without a sort: the top-k threshold is the largest logit
  with at least k logits >= it; the nucleus threshold the largest with
  probability mass (renormalised over the top-k) >= top_p at or above it."""
  V = logits_BV.shape[-1]
  keys_BV = _ordered_bits(logits_BV)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth_B = _largest_threshold(
      keys_BV, lambda t: jnp.sum(keys_BV >= t[:, None], axis=-1) >= k)
  in_k_BV = keys_BV >= kth_B[:, None]
  masked_BV = jnp.where(in_k_BV, logits_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(masked_BV, axis=-1)
  nucleus_B = _largest_threshold(
      keys_BV, lambda t: jnp.sum(jnp.where(keys_BV >= t[:, None], probs_BV, 0.0), axis=-1)
      >= top_p)
  keep_BV = in_k_BV & ((keys_BV >= nucleus_B[:, None]) | (top_p >= 1.0))
  return jnp.where(keep_BV, logits_BV, -jnp.inf)

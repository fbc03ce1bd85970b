"""Hugging Face safetensors checkpoints <-> r1jax params, converted by key name.

  config, params, model_state = load("/ckpt/DeepSeek-R1-Distill-Qwen-1.5B", dtype="bfloat16",
                                     mesh=mesh)
  save("/tmp/export", params, config)  # model-0000i-of-0000n.safetensors + index + config.json

`model_state` is the model's non-param collections ({} for the dense models;
DeepSeek-V3's router biases), as r1jax.trainers.state.TrainState keeps them.

Import streams: every target leaf is built with `jax.make_array_from_callback`
in its NamedSharding (the model's `eval_shape` + logical axis rules), and each
device's block is read on its own from the safetensors file (a `get_slice` of
just the rows/columns it holds), so no host ever holds the whole model, only
the blocks of its own devices. Export gathers one shard file's tensors at a
time (at most `max_shard_size` bytes on the host).

Architectures are a registry keyed by config.json's `model_type`: the dense
decoders (`qwen2`, `llama`) are here; `deepseek_v3` is registered on first use
when r1jax.models.deepseek_v3 provides `config_from_hf(dict)`,
`params_from_hf(get_tensor, config)` and `params_to_hf(params, config)`
(optionally `config_to_hf(config)`, `make_model(config)` for the sharded
placement, and `model_state_from_hf(get_tensor, config)`). Those read whole
tensors one at a time instead of device blocks, so the host holds the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.errors import UserError
from r1jax.models.config import ModelConfig
from r1jax.parallel.mesh import DEFAULT_RULES, logical_shardings, make_mesh

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # bytes per exported file (Hugging Face's default is 5GB)
# Checkpoint keys that carry no weights (older Llama exports save rotary buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFCheckpointError(UserError, ValueError):
  """A Hugging Face checkpoint that cannot be read: names the file and key/field."""


# ---------------------------------------------------------------------------
# Tensor maps: one checkpoint tensor <-> one r1jax leaf.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorMap:
  """r1jax leaf = reshape(transpose?(HF tensor)); the reshape only splits one axis.

  E.g. q_proj: HF [N*H, D] -> transpose -> [D, N*H] -> split axis 1 -> [D, N, H].
  """

  hf_key: str
  path: tuple[str, ...]  # r1jax params path
  transpose: bool = False  # HF stores linear maps [out, in]; r1jax [in, out]
  split: Optional[int] = None  # r1jax axes (split, split+1) are one HF axis

  def mid_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The r1jax shape with the split axes merged (= the transposed HF shape)."""
    shape = tuple(shape)
    if self.split is None:
      return shape
    s = self.split
    return shape[:s] + (shape[s] * shape[s + 1],) + shape[s + 2:]

  def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    mid = self.mid_shape(shape)
    return mid[::-1] if self.transpose else mid

  def to_r1jax(self, hf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return (hf.T if self.transpose else hf).reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    mid = x.reshape(self.mid_shape(x.shape))
    return np.ascontiguousarray(mid.T if self.transpose else mid)

  def read_block(self, get_slice: Callable[[tuple], np.ndarray], shape: Sequence[int],
                 index: tuple) -> np.ndarray:
    """The r1jax block `index` (a tuple of slices over `shape`), reading only the
    HF rows/columns it covers (whole heads along a split axis)."""
    bounds = [sl.indices(n)[:2] for sl, n in zip(index, shape)]
    if any(sl.indices(n)[2] != 1 for sl, n in zip(index, shape)):
      raise ValueError(f"strided block {index} of {self.hf_key}")
    mid = list(bounds)
    if self.split is not None:
      s, inner = self.split, shape[self.split + 1]
      (a0, a1), inner_bounds = bounds[s], bounds[s + 1]
      mid[s:s + 2] = [(a0 * inner, a1 * inner)]
    hf_bounds = mid[::-1] if self.transpose else mid
    block = get_slice(tuple(slice(a, b) for a, b in hf_bounds))
    block = block.T if self.transpose else block
    if self.split is not None:
      s = self.split
      block = block.reshape(block.shape[:s] + (a1 - a0, inner) + block.shape[s + 1:])
      block = block[(slice(None),) * (s + 1) + (slice(*inner_bounds),)]
    return block


def dense_tensor_maps(config: ModelConfig) -> list[TensorMap]:
  """The Llama/Qwen2 checkpoint keys and the r1jax leaves they fill."""
  maps = [TensorMap("model.embed_tokens.weight", ("embed_tokens", "embedding"))]
  for i in range(config.num_hidden_layers):
    hf, r1 = f"model.layers.{i}", (f"layers_{i}",)
    for proj in ("q_proj", "k_proj", "v_proj"):
      attn = r1 + ("self_attn", proj)
      maps.append(TensorMap(f"{hf}.self_attn.{proj}.weight", attn + ("kernel",), True, 1))
      if config.qkv_bias:
        maps.append(TensorMap(f"{hf}.self_attn.{proj}.bias", attn + ("bias",), False, 0))
    maps.append(TensorMap(f"{hf}.self_attn.o_proj.weight", r1 + ("self_attn", "o_proj", "kernel"),
                          True, 0))
    for proj in ("gate_proj", "up_proj", "down_proj"):
      maps.append(TensorMap(f"{hf}.mlp.{proj}.weight", r1 + ("mlp", proj, "kernel"), True))
    for norm in ("input_layernorm", "post_attention_layernorm"):
      maps.append(TensorMap(f"{hf}.{norm}.weight", r1 + (norm, "scale")))
  maps.append(TensorMap("model.norm.weight", ("norm", "scale")))
  if not config.tie_word_embeddings:
    maps.append(TensorMap("lm_head.weight", ("lm_head", "kernel"), True))
  return maps


# ---------------------------------------------------------------------------
# Dense configs: config.json <-> ModelConfig.
# ---------------------------------------------------------------------------

def _rope_fields(cfg: dict, where: str) -> dict:
  """rope_theta and llama3 scaling from transformers v4 (`rope_theta`, `rope_scaling`)
  or v5 (`rope_parameters`) config.json keys."""
  rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind in (None, "default"):
    return dict(rope_theta=float(theta))
  if kind != "llama3":
    field = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    raise HFCheckpointError(f"{where}: field {field!r} has rope_type {kind!r}; r1jax supports "
                            "'default' and 'llama3'")
  return dict(rope_theta=float(theta), rope_scaling_type="llama3",
              rope_scaling_factor=float(rope["factor"]),
              rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
              rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
              rope_original_max_position_embeddings=int(
                  rope.get("original_max_position_embeddings", 8192)))


def _require(cfg: dict, where: str, field: str, ok: Callable[[Any], bool], want: str):
  if field in cfg and not ok(cfg[field]):
    raise HFCheckpointError(f"{where}: field {field!r} is {json.dumps(cfg[field])}; r1jax's "
                            f"dense decoder supports {want}")


def dense_config_from_hf(cfg: dict, where: str = CONFIG_FILE) -> ModelConfig:
  """ModelConfig of a `qwen2` or `llama` config.json (transformers v4 or v5 keys)."""
  model_type = cfg.get("model_type")
  _require(cfg, where, "hidden_act", lambda v: v == "silu", "'silu'")
  _require(cfg, where, "mlp_bias", lambda v: not v, "false (no MLP biases)")
  if model_type == "llama":
    # Llama's attention_bias puts biases on o_proj too, which r1jax does not have.
    _require(cfg, where, "attention_bias", lambda v: not v, "false (no attention biases)")
  if model_type == "qwen2":
    _require(cfg, where, "use_sliding_window", lambda v: not v, "false (full attention)")
  try:
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim")
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        **_rope_fields(cfg, where))
  except KeyError as e:
    raise HFCheckpointError(f"{where}: field {e.args[0]!r} missing") from None
  except (TypeError, ValueError) as e:
    raise HFCheckpointError(f"{where}: {e}") from None


def dense_config_to_hf(config: ModelConfig, model_type: str) -> dict:
  """config.json for `config` as a `qwen2` or `llama` model (transformers v4 keys, which
  the real checkpoints use and v5 still reads)."""
  if model_type == "qwen2" and not config.qkv_bias:
    raise HFCheckpointError("a qwen2 checkpoint has q/k/v biases; this config has none "
                            "(export it as model_type='llama')")
  if model_type == "llama" and config.qkv_bias:
    raise HFCheckpointError("llama has no q/k/v-only biases; export this config as 'qwen2'")
  arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
  out = dict(
      architectures=[arch], model_type=model_type, vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_hidden_layers,
      num_attention_heads=config.num_attention_heads,
      num_key_value_heads=config.num_key_value_heads, head_dim=config.head_size,
      max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
      rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
      initializer_range=config.initializer_range, hidden_act="silu", attention_dropout=0.0)
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  if config.rope_scaling_type == "llama3":
    out["rope_scaling"] = dict(
        rope_type="llama3", factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings)
  return out


# ---------------------------------------------------------------------------
# The architecture registry.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HFArchitecture:
  """How one `model_type` converts. `tensor_maps` (optional) enables block-streamed
  import and per-leaf export; without it the whole-tensor functions are used."""

  config_from_hf: Callable[[dict], Any]
  params_from_hf: Callable[[Callable[[str], np.ndarray], Any], Any]  # (get_tensor, config) -> params
  params_to_hf: Callable[[Any, Any], dict]  # (params, config) -> {key: np.ndarray}
  config_to_hf: Optional[Callable[[Any], dict]] = None
  make_model: Optional[Callable[[Any], nn.Module]] = None  # its params give the shardings
  tensor_maps: Optional[Callable[[Any], list[TensorMap]]] = None
  # (get_tensor, config) -> the non-param collections (e.g. MoE router biases);
  # params_to_hf then takes them as a third argument.
  model_state_from_hf: Optional[Callable[[Callable[[str], np.ndarray], Any], dict]] = None


def _dense_architecture(model_type: str) -> HFArchitecture:
  def params_from_hf(get_tensor, config):
    model = make_dense_model(config)
    shapes = _abstract_params(model)
    params: dict = {}
    for tm in dense_tensor_maps(config):
      shape = _leaf(shapes, tm.path).shape
      _set_leaf(params, tm.path, tm.to_r1jax(np.asarray(get_tensor(tm.hf_key)), shape))
    return params

  def params_to_hf(params, config):
    return {tm.hf_key: tm.to_hf(np.asarray(jax.device_get(_leaf(params, tm.path))))
            for tm in dense_tensor_maps(config)}

  return HFArchitecture(
      config_from_hf=lambda cfg: dense_config_from_hf(cfg),
      params_from_hf=params_from_hf, params_to_hf=params_to_hf,
      config_to_hf=lambda config: dense_config_to_hf(config, model_type),
      make_model=make_dense_model, tensor_maps=dense_tensor_maps)


def make_dense_model(config: ModelConfig) -> nn.Module:
  from r1jax.models.transformer import Transformer  # deferred: keeps this module light
  return Transformer(config)


REGISTRY: dict[str, HFArchitecture] = {t: _dense_architecture(t) for t in ("qwen2", "llama")}
_LAZY = {"deepseek_v3": "r1jax.models.deepseek_v3"}
_REQUIRED = ("config_from_hf", "params_from_hf", "params_to_hf")


def register(model_type: str, architecture: HFArchitecture):
  """Adds (or replaces) the converter for config.json's `model_type`."""
  REGISTRY[model_type] = architecture


def architecture(model_type: str, where: str = CONFIG_FILE) -> HFArchitecture:
  """The converter registered for `model_type` (importing a lazy one on first use)."""
  if model_type not in REGISTRY and model_type in _LAZY:
    module_name = _LAZY[model_type]
    if importlib.util.find_spec(module_name) is not None:
      module = importlib.import_module(module_name)
      if all(hasattr(module, f) for f in _REQUIRED):
        register(model_type, HFArchitecture(
            config_from_hf=module.config_from_hf, params_from_hf=module.params_from_hf,
            params_to_hf=module.params_to_hf, config_to_hf=getattr(module, "config_to_hf", None),
            make_model=getattr(module, "make_model", None),
            model_state_from_hf=getattr(module, "model_state_from_hf", None)))
  if model_type not in REGISTRY:
    raise HFCheckpointError(f"{where}: field 'model_type' is {model_type!r}; r1jax converts "
                            f"{sorted(REGISTRY)} (and {sorted(set(_LAZY) - set(REGISTRY))} "
                            "once their model module exists)")
  return REGISTRY[model_type]


def known_model_types() -> list[str]:
  for t in _LAZY:
    try:
      architecture(t)
    except HFCheckpointError:
      pass
  return sorted(REGISTRY)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------

def read_config(path: str) -> dict:
  """The checkpoint directory's config.json."""
  file = os.path.join(path, CONFIG_FILE)
  try:
    with open(file) as f:
      cfg = json.load(f)
  except OSError as e:
    raise HFCheckpointError(f"{file}: cannot read the model config ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(cfg, dict) or "model_type" not in cfg:
    raise HFCheckpointError(f"{file}: field 'model_type' missing")
  return cfg


def checkpoint_dtype(cfg: dict) -> Optional[str]:
  """The dtype config.json says the weights are stored in (v5 `dtype`, v4 `torch_dtype`)."""
  dtype = cfg.get("dtype", cfg.get("torch_dtype"))
  return dtype if dtype in DTYPES else None


class SafetensorsFiles:
  """The tensors of a checkpoint directory: one model.safetensors, or the shards
  listed by model.safetensors.index.json. Files open lazily; use as a context."""

  def __init__(self, path: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._safe_open = safe_open
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise HFCheckpointError(f"{index}: cannot read the weight map ({e})") from None
      self.weight_map = {k: os.path.join(path, v) for k, v in weight_map.items()}
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
      single = os.path.join(path, SINGLE_FILE)
      with safe_open(single, framework="numpy") as f:
        self.weight_map = {k: single for k in f.keys()}
    else:
      raise HFCheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    self._handles: dict[str, Any] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._handles.clear()  # safe_open handles close when dropped

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def _file(self, key: str):
    if key not in self.weight_map:
      raise HFCheckpointError(f"{self.path}: tensor {key!r} missing from the checkpoint")
    file = self.weight_map[key]
    if file not in self._handles:
      try:
        self._handles[file] = self._safe_open(file, framework="numpy")
      except Exception as e:  # safetensors raises its own error types
        raise HFCheckpointError(f"{file}: cannot open ({type(e).__name__}: {e})") from None
    return self._handles[file]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._file(key).get_slice(key).get_shape())

  def get_slice(self, key: str, index: tuple) -> np.ndarray:
    return self._file(key).get_slice(key)[index]

  def get_tensor(self, key: str) -> np.ndarray:
    return self._file(key).get_tensor(key)


def _abstract_params(model: nn.Module):
  """The model's params as (boxed) ShapeDtypeStructs; nothing allocated."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])


def _leaf(tree, path: Sequence[str]):
  for p in path:
    tree = tree[p]
  return tree


def _set_leaf(tree: dict, path: Sequence[str], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _paths(tree, prefix=()) -> list[tuple[str, ...]]:
  if isinstance(tree, dict) or hasattr(tree, "keys"):
    return [q for k in tree for q in _paths(tree[k], prefix + (k,))]
  return [prefix]


def _with_dtype(config, dtype: str):
  fields = {f.name for f in dataclasses.fields(config)}
  return dataclasses.replace(config, **{k: dtype for k in ("dtype", "param_dtype") if k in fields})


def load(path: str, *, dtype: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
         rules=DEFAULT_RULES) -> tuple[Any, Any, dict]:
  """Reads a Hugging Face checkpoint directory into r1jax params.

  Args:
    path: directory with config.json and model.safetensors (or sharded files with
      model.safetensors.index.json).
    dtype: "float32" or "bfloat16" for params and activations; None = the dtype
      config.json names (float32 if it names another).
    mesh: where the params go (each leaf in its logical-axis sharding); default: a
      mesh of all devices along `data` (params replicated).
    rules: logical-axis rules.
  Returns:
    (model config with `dtype`/`param_dtype` set, params pytree of jax Arrays,
    model state: the non-param collections, replicated on the mesh; {} if none).
  """
  path = os.fspath(path)
  cfg = read_config(path)
  where = os.path.join(path, CONFIG_FILE)
  arch = architecture(cfg["model_type"], where)
  dtype = dtype or checkpoint_dtype(cfg) or "float32"
  if dtype not in DTYPES:
    raise HFCheckpointError(f"dtype={dtype!r}; supported: {DTYPES}")
  try:
    config = arch.config_from_hf(cfg)
  except HFCheckpointError as e:  # name the whole path, not just "config.json"
    message = str(e)
    if message.startswith(CONFIG_FILE + ":"):
      message = where + message[len(CONFIG_FILE):]
    raise HFCheckpointError(message) from None
  except (KeyError, TypeError, ValueError) as e:
    raise HFCheckpointError(f"{where}: {type(e).__name__}: {e}") from None
  config = _with_dtype(config, dtype)
  mesh = mesh if mesh is not None else make_mesh({"data": -1})
  np_dtype = np.dtype(jnp.dtype(dtype))

  with SafetensorsFiles(path) as files:
    model_state = {}
    if arch.model_state_from_hf is not None:  # small (router biases): replicated
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      model_state = jax.device_put(arch.model_state_from_hf(files.get_tensor, config), replicated)
    shapes = shardings = None
    if arch.make_model is not None:
      boxed = _abstract_params(arch.make_model(config))
      shardings = nn.unbox(logical_shardings(boxed, mesh, rules))
      shapes = nn.unbox(boxed)
    if arch.tensor_maps is None:
      params = arch.params_from_hf(files.get_tensor, config)
      cast = lambda x: np.asarray(x).astype(np_dtype)
      if shardings is None:
        return config, jax.tree.map(lambda x: jax.device_put(cast(x)), params), model_state
      return (config, jax.tree.map(lambda x, s: jax.device_put(cast(x), s), params, shardings),
              model_state)

    maps = arch.tensor_maps(config)
    expected = {tm.path for tm in maps}
    missing_leaves = set(_paths(shapes)) - expected
    if missing_leaves:  # a converter bug, not the user's
      raise RuntimeError(f"no checkpoint tensor maps to {sorted(missing_leaves)[:3]}")
    used = {tm.hf_key for tm in maps}
    extra = [k for k in files.keys() if k not in used and not k.endswith(_IGNORED_SUFFIXES)
             and not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if extra:
      raise HFCheckpointError(
          f"{path}: {len(extra)} checkpoint tensors do not fit a {cfg['model_type']} model "
          f"with this config.json (first: {extra[0]!r}); is config.json from this checkpoint?")
    params: dict = {}
    for tm in maps:
      shape = _leaf(shapes, tm.path).shape
      got = files.shape(tm.hf_key)
      if got != tm.hf_shape(shape):
        raise HFCheckpointError(
            f"{files.weight_map[tm.hf_key]}: tensor {tm.hf_key!r} has shape {list(got)}, "
            f"config.json implies {list(tm.hf_shape(shape))}")

      def block(index, tm=tm, shape=shape):
        return tm.read_block(lambda i: files.get_slice(tm.hf_key, i), shape, index
                             ).astype(np_dtype)

      _set_leaf(params, tm.path,
                jax.make_array_from_callback(shape, _leaf(shardings, tm.path), block))
  return config, params, model_state


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------

def _dtype_name(x) -> str:
  return str(jnp.dtype(x.dtype))


def _to_host(x) -> np.ndarray:
  """The whole array on this host (gathered across processes if it spans several)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save(path: str, params: Any, config: Any, *, model_state: Optional[dict] = None,
         model_type: Optional[str] = None, dtype: Optional[str] = None,
         max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
         extra_config: Optional[dict] = None) -> list[str]:
  """Writes `params` as a Hugging Face checkpoint that transformers' from_pretrained loads.

  Args:
    path: output directory (created; existing checkpoint files are replaced).
    params: r1jax params (jax or NumPy arrays, any sharding).
    config: the model config.
    model_state: the non-param collections (DeepSeek-V3's router biases); {} / None if none.
    model_type: "qwen2" / "llama" / another registered type; default: qwen2 when the
      config has q/k/v biases, else llama.
    dtype: "float32" / "bfloat16" to cast to; None keeps the params' dtype.
    max_shard_size: bytes per safetensors file; more tensors than fit go to further
      files listed in model.safetensors.index.json (one file: model.safetensors).
    extra_config: keys merged into config.json (e.g. bos/eos token ids).
  Returns:
    The written file names.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if model_type is None:
    model_type = getattr(config, "model_type", None) or (
        "qwen2" if getattr(config, "qkv_bias", False) else "llama")
  arch = architecture(model_type, where=f"model_type={model_type!r}")
  if dtype is not None and dtype not in DTYPES:
    raise HFCheckpointError(f"dtype={dtype!r}; supported: {DTYPES}")
  os.makedirs(path, exist_ok=True)

  # (key, shape, dtype, producer): tensors are materialised one shard file at a time.
  if arch.tensor_maps is not None:
    entries = []
    for tm in arch.tensor_maps(config):
      leaf = _leaf(params, tm.path)
      out_dtype = np.dtype(jnp.dtype(dtype or _dtype_name(leaf)))
      entries.append((tm.hf_key, tm.hf_shape(leaf.shape), out_dtype,
                      lambda tm=tm, leaf=leaf, d=out_dtype: tm.to_hf(_to_host(leaf)).astype(d)))
  else:
    tensors = (arch.params_to_hf(params, config, model_state) if model_state
               else arch.params_to_hf(params, config))
    entries = []
    for key, value in tensors.items():
      out_dtype = np.dtype(jnp.dtype(dtype or _dtype_name(value)))
      entries.append((key, tuple(value.shape), out_dtype,
                      lambda v=value, d=out_dtype: _to_host(v).astype(d)))

  shards: list[list] = [[]]
  size = 0
  for entry in entries:
    nbytes = math.prod(entry[1]) * entry[2].itemsize
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  # Stale files of an earlier export would shadow or mix with these.
  for old in os.listdir(path):
    if old.endswith(".safetensors") or old == INDEX_FILE:
      os.remove(os.path.join(path, old))
  weight_map, total = {}, 0
  is_writer = jax.process_index() == 0
  for name, shard in zip(names, shards):
    # One file's worth on the host; C order, as safetensors writes the raw buffer.
    arrays = {key: np.ascontiguousarray(make()) for key, _, _, make in shard}
    if is_writer:
      save_file(arrays, os.path.join(path, name), metadata={"format": "pt"})
    for key, arr in arrays.items():
      weight_map[key] = name
      total += arr.nbytes
    del arrays
  if not is_writer:
    return names
  if len(names) > 1:
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                sort_keys=True)
  if arch.config_to_hf is None:
    raise HFCheckpointError(f"model_type {model_type!r} has no config_to_hf; the weights are "
                            f"written to {path} but config.json is not")
  hf_config = dict(arch.config_to_hf(config))
  stored = {str(d) for _, _, d, _ in entries}
  if len(stored) == 1:  # v5 reads `dtype`, v4 `torch_dtype`
    hf_config["dtype"] = hf_config["torch_dtype"] = stored.pop()
  hf_config.update(extra_config or {})
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return names + ([INDEX_FILE] if len(names) > 1 else []) + [CONFIG_FILE]

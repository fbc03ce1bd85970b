"""Hugging Face safetensors import/export against `transformers` on the same
weights: small random Qwen2 (tied, q/k/v biases) and Llama (llama3 rope
scaling, head_dim != D/N, MQA) checkpoints made here, saved sharded; bf16
bit-exact; DeepSeek-V3 through the registry; errors naming file and key; and
the sharded import reading only each device's block (8 fake CPU devices)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from r1jax.checkpoint import hf  # pylint: disable=wrong-import-position
from r1jax.models.transformer import Transformer  # pylint: disable=wrong-import-position

VOCAB = 101
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1000.0, tie_word_embeddings=True),
    # original_max_position_embeddings=16 puts the llama3 rescaling's three
    # wavelength bands (kept / interpolated / slowed) inside head_dim 16.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)),
}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 40))


def _random_model(kind: str, dtype=torch.float32):
  """A transformers model with every weight random (biases too; norms 1 + noise)."""
  torch.manual_seed({"qwen2": 0, "llama": 1}[kind])
  config = CONFIGS[kind]()
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.2 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
  return model.to(dtype).eval()


def _torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def _r1jax_logits(config, params) -> np.ndarray:
  logits, _ = jax.jit(Transformer(config).apply)({"params": params}, jnp.asarray(TOKENS))
  return np.asarray(logits)


def _tensors(path: str) -> dict:
  out = {}
  for name in os.listdir(path):
    if name.endswith(".safetensors"):
      out.update(safetensors_numpy.load_file(os.path.join(path, name)))
  return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
  """(kind, torch model, its sharded safetensors directory)."""
  model = _random_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path, max_shard_size="10KB")
  return request.param, model, str(path)


def test_import_matches_transformers(checkpoint):
  kind, model, path = checkpoint
  assert os.path.exists(os.path.join(path, hf.INDEX_FILE))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 3  # really sharded
  config, params, _ = hf.load(path, dtype="float32")
  assert config.qkv_bias == (kind == "qwen2")
  assert config.tie_word_embeddings == (kind == "qwen2")
  assert config.rope_scaling_type == (None if kind == "qwen2" else "llama3")
  assert config.head_size == (8 if kind == "qwen2" else 16)
  err = np.abs(_r1jax_logits(config, params) - _torch_logits(model)).max()
  assert err < 1e-4, err


def test_export_reloads_in_transformers(checkpoint, tmp_path):
  kind, model, path = checkpoint
  config, params, _ = hf.load(path, dtype="float32")
  hf.save(tmp_path, params, config, max_shard_size=8000)
  index = json.load(open(tmp_path / hf.INDEX_FILE))
  assert len(set(index["weight_map"].values())) > 3
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert reloaded.config.model_type == kind
  err = np.abs(_torch_logits(reloaded) - _torch_logits(model)).max()
  assert err < 1e-4, err
  # Nothing was renamed or altered on the way: the same tensors, bit for bit.
  original, exported = _tensors(path), _tensors(str(tmp_path))
  if config.tie_word_embeddings:  # transformers saves no lm_head when tied
    assert "lm_head.weight" not in original
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_bf16_round_trip_is_bit_exact(tmp_path):
  model = _random_model("llama", torch.bfloat16)
  src, out = tmp_path / "src", tmp_path / "out"
  model.save_pretrained(src, max_shard_size="10KB")
  config, params, _ = hf.load(src)  # dtype from config.json
  assert config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  hf.save(out, params, config)
  original, exported = _tensors(str(src)), _tensors(str(out))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
    assert exported[key].tobytes() == value.tobytes(), key
  assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"


def test_float32_checkpoint_cast_to_bf16_rounds_like_torch(checkpoint):
  kind, model, path = checkpoint
  _, params, _ = hf.load(path, dtype="bfloat16")
  want = model.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
  got = np.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"]).T
  np.testing.assert_array_equal(got.astype(np.float32), want.float().numpy(), err_msg=kind)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama_errors")
  _random_model("llama").save_pretrained(path, max_shard_size="10KB")
  return str(path)


def _rewrite_config(path, **changes):
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg.update(changes)
  json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


@pytest.mark.parametrize("change,needles", [
    (dict(model_type="gpt2"), ["config.json", "model_type", "gpt2"]),
    (dict(hidden_act="gelu"), ["config.json", "hidden_act", "gelu"]),
    (dict(intermediate_size=64), ["mlp.gate_proj.weight", "shape", "[48, 32]", ".safetensors"]),
    (dict(num_hidden_layers=1), ["do not fit", "model.layers.1."]),
    (dict(num_hidden_layers=3), ["model.layers.2.", "missing"]),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), ["rope_parameters", "yarn"]),
])
def test_bad_checkpoint_errors_name_file_and_field(llama_dir, tmp_path, change, needles):
  shutil.copytree(llama_dir, tmp_path / "c")
  _rewrite_config(tmp_path / "c", **change)
  with pytest.raises(hf.HFCheckpointError) as e:
    hf.load(tmp_path / "c")
  assert str(e.value).startswith(str(tmp_path / "c")), str(e.value)  # the file, in full
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_missing_checkpoint_files(tmp_path):
  with pytest.raises(hf.HFCheckpointError, match="config.json"):
    hf.load(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama"]().to_dict()))
  with pytest.raises(hf.HFCheckpointError, match="model.safetensors"):
    hf.load(tmp_path)


def test_deepseek_v3_registers_lazily_and_round_trips(tmp_path):
  """The registry's whole-tensor path: r1jax.models.deepseek_v3's converters, found
  by model_type, with its router biases as model state."""
  dsv3 = pytest.importorskip("r1jax.models.deepseek_v3")
  config = transformers.DeepseekV3Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
      kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
      n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
      first_k_dense_replace=1, max_position_embeddings=64, num_mtp_layers=0,
      attn_implementation="eager")
  torch.manual_seed(2)
  model = transformers.DeepseekV3ForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
  assert "deepseek_v3" in hf.known_model_types()
  ours, params, state = hf.load(tmp_path / "src", dtype="float32")
  assert isinstance(ours, dsv3.DeepseekV3Config) and state  # the router biases came along
  # (Logits of these params against transformers: tests/test_deepseek_v3.py.)
  hf.save(tmp_path / "out", params, ours, model_state=state, max_shard_size=20_000)
  original, exported = _tensors(str(tmp_path / "src")), _tensors(str(tmp_path / "out"))
  assert sorted(exported) == sorted(original) and len(os.listdir(tmp_path / "out")) > 3
  for key, value in original.items():  # per-expert weights and router biases included
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  err = np.abs(_torch_logits(reloaded) - _torch_logits(model)).max()
  assert err < 1e-4, err


_MESH_SCRIPT = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, sys
    from r1jax.checkpoint import hf
    from r1jax.models.config import ModelConfig
    from r1jax.models.transformer import Transformer
    from r1jax.parallel.mesh import make_mesh

    assert jax.device_count() == 8
    config = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, qkv_bias=True)
    shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 1, x.shape).astype(np.float32), shapes)
    hf.save(sys.argv[1], params, config, max_shard_size=10_000)
    reads = []
    get_slice = hf.SafetensorsFiles.get_slice
    def spy(self, key, index):
      out = get_slice(self, key, index)
      reads.append((key, out.size))
      return out
    hf.SafetensorsFiles.get_slice = spy
    _, loaded, _ = hf.load(sys.argv[1], mesh=make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
      np.testing.assert_array_equal(a, np.asarray(b))
    q = loaded["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [D, N, H] over (fsdp, tensor)
    assert {s.data.shape for s in q.addressable_shards} == {(16, 1, 8)}, q.sharding
    # Every device read its own eighth of q_proj, and nothing else of it.
    q_reads = [n for k, n in reads if k == "model.layers.0.self_attn.q_proj.weight"]
    assert q_reads == [32 * 32 // 8] * 8, q_reads
    norm_reads = [n for k, n in reads if k == "model.norm.weight"]
    assert sum(norm_reads) <= 32 * len(norm_reads) and len(norm_reads) >= 1
    print("ok")
""")


def test_sharded_import_reads_only_each_devices_block(tmp_path):
  """Under an 8-device (fsdp 2 x tensor 4) mesh each device's block comes from its
  own slice read (a subprocess: XLA_FLAGS must be set before JAX starts)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

"""Sharded equals unsharded: init, forward and a train step on a (data, fsdp,
tensor) mesh of 8 fake CPU devices match one device, also when the vocabulary
and the kv heads do not divide the tensor axis (those dimensions fall back to
fewer axes). Runs in a subprocess because XLA_FLAGS must be set before JAX
starts."""

from types import SimpleNamespace

import os
import subprocess
import sys
import textwrap

import pytest

from r1jax.parallel.mesh import divisible_spec, make_mesh

_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from configs import pretrain as pretrain_config
    from r1jax.data.packing import PackedDataset, pack_documents
    from r1jax.models.config import ModelConfig
    from r1jax.models.transformer import Transformer
    from r1jax.parallel.mesh import batch_sharding, make_mesh, mesh_rules
    from r1jax.trainers import sft
    from r1jax.trainers.optim import make_optimizer
    from r1jax.trainers.state import create_train_state

    assert jax.device_count() == 8
    c = pretrain_config.get_config("smoke")
    c.model.update(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    model = Transformer(ModelConfig(**c.model))
    tx = make_optimizer(c.optim, 10)
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(4, 64, rng.integers(3, 20))) for _ in range(40)]
    batch = PackedDataset(pack_documents(docs, 32, bos_id=2, eos_id=3), 8, 0).batch(0)

    def one_step(mesh, model=model):
      state, shardings = create_train_state(model, tx, mesh, seed=0)
      with mesh_rules(mesh):
        step = sft.jit_train_step(lambda s, b: sft.train_step(s, b, model=model, tx=tx),
                                  shardings, mesh)
        state, m = step(state, jax.device_put(batch, batch_sharding(mesh)))
      return jax.device_get(state.params), jax.device_get(m), state

    p1, m1, _ = one_step(make_mesh({"data": 1}, devices=jax.devices()[:1]))
    p8, m8, s8 = one_step(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    q = s8.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding
    assert len(q.addressable_shards) == 8
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Vocabulary 62 and 2 kv heads on a 4-way tensor axis: replicated on it.
    c.model.update(vocab_size=62)
    odd = Transformer(ModelConfig(**c.model))
    p1, m1, _ = one_step(make_mesh({"data": 1}, devices=jax.devices()[:1]), odd)
    p8, m8, s8 = one_step(make_mesh({"fsdp": 2, "tensor": 4}), odd)
    P = jax.sharding.PartitionSpec
    assert s8.params["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
    assert s8.params["layers_0"]["self_attn"]["k_proj"]["kernel"].sharding.spec == P("fsdp")
    assert s8.params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == \
        P("fsdp", "tensor", None)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("SHARDED_OK", float(m8["loss"]))
""")


def test_sharded_train_step_equals_single_device():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                        cwd=repo, env=env, timeout=600)
  assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match="unknown mesh axes"):
    make_mesh({"model": 2})
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 3 devices"):
    make_mesh({"data": 3})


def test_indivisible_dimensions_shard_over_the_axes_that_divide_them():
  mesh = SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 4, "expert": 4})
  P = __import__("jax").sharding.PartitionSpec
  assert divisible_spec(P("tensor", "fsdp"), (64, 32), mesh) == (P("tensor", "fsdp"), [])
  spec, notes = divisible_spec(P("tensor", "fsdp"), (62, 32), mesh)
  assert spec == P(None, "fsdp") and notes == [
      "dim 0 (62) not divisible by tensor=4: sharded over nothing"]
  spec, notes = divisible_spec(P(("data", "fsdp")), (12, 3), mesh)  # 12 = 2 x 6: data only
  assert spec == P("data") and "not divisible by dataxfsdp=8: sharded over data" in notes[0]
  spec, _ = divisible_spec(P("expert", "fsdp", "tensor"), (9, 32, 16), mesh)  # 9 experts
  assert spec == P(None, "fsdp", "tensor")

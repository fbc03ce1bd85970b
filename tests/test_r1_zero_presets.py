"""The real R1-Zero presets build, shard on an 8-device mesh and lower the
GRPO step with `jax.eval_shape` inputs only (nothing allocated). Runs in a
subprocess because XLA_FLAGS must be set before JAX starts."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import functools, importlib.util, sys
    import jax, jax.numpy as jnp, numpy as np
    from r1jax.models.config import ModelConfig
    from r1jax.models.transformer import Transformer
    from r1jax.parallel.mesh import batch_sharding, make_mesh, mesh_rules
    from r1jax.trainers import grpo
    from r1jax.trainers.optim import make_optimizer
    from r1jax.trainers.state import abstract_train_state

    spec = importlib.util.spec_from_file_location("cfg", "configs/r1_zero.py")
    cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
    name, want_params = sys.argv[1], float(sys.argv[2])
    c = cfg.get_config(name)
    c.mesh.update(data=2, fsdp=2, tensor=2)  # 8 fake devices stand in for the pod
    model = Transformer(ModelConfig(**c.model))
    mesh = make_mesh(dict(c.mesh))
    tx = make_optimizer(c.optim, c.grpo.num_steps)
    state = abstract_train_state(model, tx, mesh)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert abs(n / want_params - 1) < 0.01, (name, n)
    q = state.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None), q.sharding
    # One mini-batch of the preset: 2 prompts x G rows of prompt + completion.
    B = c.grpo.prompts_per_step * c.grpo.num_generations // c.grpo.num_minibatches
    T = 256 + c.grpo.max_new_tokens
    bs = batch_sharding(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=bs)
    batch = dict(tokens=sds((B, T), jnp.int32), positions=sds((B, T), jnp.int32),
                 segment_ids=sds((B, T), jnp.int32), mask=sds((B, T - 1), jnp.float32),
                 old_logp=sds((B, T - 1), jnp.float32), ref_logp=sds((B, T - 1), jnp.float32),
                 advantages=sds((B,), jnp.float32), truncated=sds((B,), jnp.bool_))
    step = functools.partial(grpo.grpo_train_step, model=model, loss=grpo.make_loss(c.grpo),
                             tx=tx, temperature=c.grpo.temperature)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    with mesh_rules(mesh):
      new_state, metrics = jax.eval_shape(step, state, batch)
      lowered = jax.jit(step, in_shardings=(shardings, bs),
                        out_shardings=(shardings, None)).lower(state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert {"loss", "kl", "entropy", "clip_ratio/region_mean"} <= set(metrics)
    print("PRESET_OK", name, n, B, T)
""")


@pytest.mark.parametrize("name,num_params", [
    ("qwen2.5-math-1.5b", 1.54e9),  # published: 1.54B (embeddings tied)
    ("qwen2.5-math-7b", 7.62e9),  # published: 7.62B
])
def test_real_preset_builds_shards_and_lowers(name, num_params):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, name, str(num_params)],
                        capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert proc.returncode == 0 and "PRESET_OK" in proc.stdout, proc.stderr[-3000:]


def test_deepseek_v3_preset_builds_the_moe_model():
  """configs/r1_zero.py:deepseek-v3 is the 671B model with experts on an `expert`
  mesh axis (its shapes and counts: tests/test_deepseek_v3.py)."""
  from r1jax.models import deepseek_v3
  from r1jax.models.build import build_model
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs/r1_zero.py"))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  c = cfg.get_config("deepseek-v3")
  model = build_model(c.model)
  assert isinstance(model, deepseek_v3.DeepseekV3)
  assert model.config == deepseek_v3.PRESETS["deepseek-v3"]
  assert c.mesh.expert > 1 and c.grpo.num_generations == 16

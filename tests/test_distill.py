"""Token-level distillation step: at kd_weight 0 it is the SFT step; at
kd_weight 1 a student equal to its teacher has zero loss and gradient, and a
different one moves towards the teacher (its KL falls). Presets build."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax.losses.distill import TokenKDLoss
from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import make_mesh
from r1jax.trainers import distill, sft
from r1jax.trainers.state import create_train_state

MC = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 max_position_embeddings=64)


def _batch(rng, B=2, T=12):
  tokens = rng.integers(3, 48, (B, T + 1)).astype(np.int32)
  weights = (np.arange(T)[None] >= 4).astype(np.float32).repeat(B, 0)
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_weights=weights,
      positions=np.broadcast_to(np.arange(T), (B, T)).astype(np.int32),
      segment_ids=np.ones((B, T), np.int32)).items()}


def _states(tx):
  model = Transformer(MC)
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  student, _ = create_train_state(model, tx, mesh, seed=0)
  teacher, _ = create_train_state(model, tx, mesh, seed=1)
  return model, student, teacher


def _kd_step(model, tx, weight, temperature=1.0):
  return jax.jit(functools.partial(distill.kd_train_step, model=model, teacher_model=model,
                                   loss=TokenKDLoss(temperature=temperature), kd_weight=weight,
                                   tx=tx))


def test_kd_weight_zero_is_the_sft_step():
  tx = optax.sgd(0.1)
  model, student, teacher = _states(tx)
  batch = _batch(np.random.default_rng(0))
  want, want_m = jax.jit(functools.partial(sft.train_step, model=model, tx=tx,
                                           impl="reference"))(student, batch)
  model, student, teacher = _states(tx)
  got, got_m = _kd_step(model, tx, 0.0)(student, batch, teacher.params, {})
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
  np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got.params, want.params)
  assert float(got_m["kd_loss"]) > 0.01  # different models: the KD term is there, weighted 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_pulls_the_student_to_the_teacher(temperature):
  tx = optax.adam(1e-2)
  model, student, teacher = _states(tx)
  batch = _batch(np.random.default_rng(1))
  step = _kd_step(model, tx, 1.0, temperature)
  _, same = step(student, batch, student.params, {})  # student == teacher
  assert float(same["kd_loss"]) < 1e-6 and float(same["grad_norm"]) < 1e-5
  kls = []
  for _ in range(20):
    student, m = step(student, batch, teacher.params, {})
    kls.append(float(m["kd/kl"]))
  assert kls[-1] < 0.5 * kls[0], kls
  assert float(m["kd/agreement"]) > 0.5


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-math-1.5b", "llama3.3-70b"])
def test_distill_presets_build(preset):
  from r1jax.main import load_config
  from r1jax.models.build import build_model
  import os
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config(f"{repo}/configs/distill.py:{preset}")
  model = build_model(c.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert c.stage == "distill" and c.distill.method == "sequence" and n > 0
  if preset != "tiny":
    assert c.sft.num_epochs == 2 and c.sft.batch_size == 64 and c.optim.learning_rate <= 1e-4

"""No step recompiles after the first: the real GRPO loop runs 3 steps and
every jitted program it calls — train step, sampler, reference forward — is
compiled once. The steps' prompts differ in length by a few tokens, inside one
32-token bucket: prompts in different buckets compile one program per bucket,
by design (r1jax.sampling.sampler, grpo.build_batch). (The SFT and GRPO train
steps alone, 3 steps on each of three meshes: tests/test_mesh_equivalence.py.)"""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.models.config import ModelConfig
from r1jax.models.transformer import Transformer
from r1jax.parallel.mesh import logical_shardings, make_mesh
from r1jax.sampling import sampler
from r1jax.trainers import grpo, sft
from r1jax.trainers.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _host_params(model, mesh):
  """Random params placed into their shardings (skips the seconds-long init compile)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  rng = np.random.default_rng(0)
  host = jax.tree.map(lambda x: rng.normal(0.0, 0.05, x.shape).astype(x.dtype),
                      nn.unbox(boxed["params"]))
  return jax.device_put(host, nn.unbox(logical_shardings(boxed["params"], mesh)))


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
  """3 GRPO steps through grpo.train; what each jitted program compiled meanwhile."""
  from r1jax.data import tinyworld
  from r1jax.data.tokenizer import load_tokenizer, train_sentencepiece
  tmp_path = tmp_path_factory.mktemp("grpo_recompile")
  tok = load_tokenizer(train_sentencepiece(tinyworld.pretraining_corpus(2000, seed=0),
                                           tmp_path / "tw", vocab_size=640))
  c = _load_config("r1_zero", "smoke")
  # beta > 0: the reference forward is one of the programs.
  c.grpo.update(num_steps=3, prompts_per_step=2, num_generations=4, max_new_tokens=8,
                beta=0.04, log_samples_every=0, eval_every=0)
  c.train.update(checkpoint_every=100, progress_bar=False)
  model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=512))
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  made = []
  original = sft.jit_train_step

  def recording(*args, **kwargs):
    made.append(original(*args, **kwargs))
    return made[-1]

  # Module-level jits are shared with other tests: count what this run adds.
  before = dict(sample=sampler._generate._cache_size(),
                reference=grpo.reference_logprobs._cache_size())
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(grpo, "jit_train_step", recording)
    state = grpo.train(c, str(tmp_path / "run"), model=model, tokenizer=tok, mesh=mesh,
                       tx=make_optimizer(c.optim, 3), init_params=_host_params(model, mesh),
                       rewards={"length": (lambda p, comp, ref: float(len(comp) % 3), 1.0)})
  assert int(state.step) == 3 and len(made) == 1
  return dict(train_step=made[0]._cache_size(),
              sample=sampler._generate._cache_size() - before["sample"],
              reference=grpo.reference_logprobs._cache_size() - before["reference"])


def test_grpo_loop_samples_and_scores_the_reference_with_one_compile_each(grpo_run):
  assert grpo_run["sample"] <= 1, grpo_run
  assert grpo_run["reference"] <= 1, grpo_run


# create_train_state gives the optimizer state explicit out shardings: the
# Adam count is on the mesh from the start, as the first step returns it.
def test_grpo_loop_compiles_its_train_step_once(grpo_run):
  assert grpo_run["train_step"] == 1, grpo_run

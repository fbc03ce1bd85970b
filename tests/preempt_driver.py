"""A run for tests/test_preemption.py to kill: the r1jax CLI, or a micro GRPO
run through the real `grpo.train` loop (seconds instead of minutes).

  python tests/preempt_driver.py [--commit-kill N] cli <r1jax.main flags...>
  python tests/preempt_driver.py [--commit-kill N] micro WORKDIR TOKENIZER_MODEL

With --commit-kill N the process SIGKILLs itself in the middle of its Nth
checkpoint commit: every file of the step is written to orbax's temporary
directory, the rename that publishes it has not happened.
"""

import importlib.util
import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_in_commit(n: int):
  original = atomicity.AtomicRenameTemporaryPath.finalize
  calls = [0]

  async def finalize(self):
    # Orbax commits each item (state/, meta/) inside the step's temporary
    # directory, then the step directory itself: count step commits only.
    if atomicity.TMP_DIR_SUFFIX not in self.get().parent.name:
      calls[0] += 1
      if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def varied_reward(prompt, completion, reference):
  """Differs between completions, so advantages (and updates) are not 0."""
  return float(len(completion) % 3)


def micro(workdir: str, tokenizer_path: str):
  """4 GRPO steps of a 1-layer model with the KL term, reference refreshed every 2 steps,
  a checkpoint and a sample table every step."""
  import optax
  from r1jax.data.tokenizer import load_tokenizer
  from r1jax.models.config import ModelConfig
  from r1jax.models.transformer import Transformer
  from r1jax.parallel.mesh import make_mesh
  from r1jax.trainers import grpo
  from r1jax.trainers.optim import make_optimizer
  from r1jax.trainers.state import create_train_state

  spec = importlib.util.spec_from_file_location("r1_zero_config",
                                                os.path.join(REPO, "configs", "r1_zero.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("smoke")
  c.grpo.update(num_steps=4, prompts_per_step=2, num_generations=4, max_new_tokens=8, beta=0.04,
                ref_refresh_every=2, log_samples_every=1, eval_every=0)
  c.train.update(checkpoint_every=1, progress_bar=False)
  c.optim.update(learning_rate=0.05, warmup_steps=0)
  tok = load_tokenizer(tokenizer_path)
  model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=512))
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  init, _ = create_train_state(model, optax.sgd(0.0), mesh, seed=0)
  tx = make_optimizer(c.optim, c.grpo.num_steps * grpo.updates_per_step(c.grpo))
  grpo.train(c, workdir, model=model, tokenizer=tok, mesh=mesh, tx=tx, init_params=init.params,
             rewards={"varied": (varied_reward, 1.0)})


def main():
  args = sys.argv[1:]
  if args[0] == "--commit-kill":
    kill_in_commit(int(args[1]))
    args = args[2:]
  if args[0] == "micro":
    micro(*args[1:])
  else:
    sys.argv = ["r1jax.main"] + args[1:]
    from r1jax import main as cli
    cli.run()


if __name__ == "__main__":
  main()

"""Orbax checkpoints of the train state plus JSON metadata, keep-N, resume.

Orbax writes each step into a temporary directory and renames it only when
complete, so a run killed mid-save never leaves a checkpoint that is taken as
complete; `latest_step` sees finished ones only, and the temporary directories
of killed saves are deleted (in the background) when the next run opens the
directory (tests/test_preemption.py kills runs inside a commit).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from r1jax.errors import UserError


class CheckpointError(UserError, RuntimeError):
  """A checkpoint exists but cannot be read."""


class Checkpointer:
  """Saves/restores `(state pytree, metadata dict)` under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores into the shapes/shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {self.directory}")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types; name the checkpoint
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} is corrupt or incompatible "
          f"({type(e).__name__}: {first_line[:300]}); it was left untouched — move it "
          f"away to resume from an earlier step") from e
    return restored["state"], dict(restored["meta"])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) mirroring a concrete pytree."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def restore_model(directory: str, abstract_params: Any, abstract_model_state: Any = None,
                  step: Optional[int] = None) -> tuple[Any, Any, int]:
  """Only the model of a checkpoint: the params and (when `abstract_model_state` is
  given: MoE router biases) the model state of a pretrain/SFT `state` or a GRPO
  `state.state`, into the shapes/shardings of the abstract trees; the optimizer
  state is never read. Returns (params, model_state or {}, step)."""
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  wanted = {"params": abstract_params}
  if abstract_model_state:
    wanted["model_state"] = abstract_model_state
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {directory}")
    where = os.path.join(directory, str(step))
    try:
      tree = manager.item_metadata(step)["state"].tree
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise CheckpointError(f"checkpoint {where} is corrupt or unreadable "
                            f"({type(e).__name__}: {str(e)[:300]})") from e
    prefix = () if "params" in tree else ("state",)
    saved = tree
    for key in prefix:
      saved = saved.get(key, {}) if hasattr(saved, "get") else {}
    shape = lambda x: tuple(x.shape)
    for name, abstract in wanted.items():
      if not hasattr(saved, "keys") or name not in saved:
        raise CheckpointError(f"checkpoint {where} has no {name} (state keys: {sorted(tree)})")
      if (jax.tree.structure(jax.tree.map(shape, saved[name])) !=
          jax.tree.structure(jax.tree.map(shape, abstract)) or
          jax.tree.leaves(jax.tree.map(shape, saved[name])) !=
          jax.tree.leaves(jax.tree.map(shape, abstract))):
        raise CheckpointError(f"checkpoint {where} holds {name} of another model shape than "
                              "the config asks for")
    item = wanted
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), wanted)
    for key in reversed(prefix):
      item, restore_args = {key: item}, {key: restore_args}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True)))["state"]
  finally:
    manager.close()
  for key in prefix:
    restored = restored[key]
  return restored["params"], restored.get("model_state", {}), step

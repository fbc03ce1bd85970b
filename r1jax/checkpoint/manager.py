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

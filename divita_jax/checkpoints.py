"""Training checkpoints of one fold: managers, restore, save, preemption.

Layout under a fold's folder: `checkpoints/` (the latest two: train state,
host state and input-iterator state together) and `best/` (variables of
the best validation epoch). Orbax writes each checkpoint to a temporary
folder and renames it when complete, so a crash or a full disk never
damages an earlier one.

A SIGTERM (preemption) is recorded by `Sigterm`; the trainer checkpoints
at the next step and raises `Preempted`, which `main.py` turns into exit
status 143. Library code never calls `sys.exit`.
"""

import os
import signal
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

LATEST, BEST = "checkpoints", "best"


class Preempted(Exception):
  """Training stopped on SIGTERM after writing a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"Preempted: checkpoint at step {step} written.")
    self.step = step


def _tree_handler() -> ocp.PyTreeCheckpointHandler:
  """PyTree handler writing whole arrays.

  Orbax's default replica-parallel save slices every replicated array per
  replica, compiling one slice per shape: tens of seconds on CPU for a head
  checkpoint of a few MB, which replica-parallel writes don't speed up.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def managers(fold_dir: str):
  """(latest, best): latest keeps two, so a broken newest falls back."""
  out = []
  for sub, item, keep in ((LATEST, "state", 2), (BEST, "variables", 1)):
    out.append(
      ocp.CheckpointManager(
        os.path.join(fold_dir, sub),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=False, create=True
        ),
        item_handlers={
          item: _tree_handler(),
          "host": ocp.JsonCheckpointHandler(),
        },
      )
    )
  return tuple(out)


def restore(mngr, item: str, abstract):
  """Newest readable checkpoint (item, host dict), or (None, None).

  An unreadable checkpoint (e.g. truncated by a full disk) is reported,
  deleted and the previous one is tried.
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out = mngr.restore(
        step,
        args=ocp.args.Composite(
          **{
            item: ocp.args.PyTreeRestore(abstract, restore_args),
            "host": ocp.args.JsonRestore(),
          }
        ),
      )
      return out[item], out["host"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint.
      logging.warning(
        "Checkpoint %d in %s is unreadable (%s: %s); deleting it and "
        "falling back to the previous one.",
        step,
        mngr.directory,
        type(e).__name__,
        e,
      )
      mngr.delete(step)
  return None, None


def save(mngr, step: int, item: str, tree, host: dict):
  """Writes a checkpoint; a failure is a clear error, earlier ones intact."""
  if step in mngr.all_steps():  # Re-done epoch after a kill: same content.
    return
  try:
    mngr.save(
      step,
      args=ocp.args.Composite(
        **{item: ocp.args.PyTreeSave(tree), "host": ocp.args.JsonSave(host)}
      ),
    )
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - full disk, unwritable dir, ...
    raise OSError(
      f"Could not write checkpoint step {step} under {mngr.directory} "
      f"({type(e).__name__}: {e}). The previous checkpoints "
      f"{list(mngr.all_steps())} are intact; free space or fix the "
      "permissions and rerun with the same workdir to resume."
    ) from e


def load_best(fold_dir: str, abstract_variables: Callable[[dict], object]):
  """(variables, host info) of the best-validation checkpoint of a fold.

  abstract_variables: num_features -> the variables' abstract tree (with
  shardings), e.g. from `train.programs`.
  """
  _, best = managers(fold_dir)
  step = best.latest_step()
  if step is None:
    raise FileNotFoundError(f"No best checkpoint under {fold_dir}/{BEST}.")
  host = best.restore(
    step, args=ocp.args.Composite(host=ocp.args.JsonRestore())
  )["host"]
  abstract = abstract_variables(host["num_features"])
  variables, host = restore(best, "variables", abstract)
  if variables is None:
    raise ValueError(
      f"The best checkpoint under {fold_dir}/{BEST} is unreadable."
    )
  return variables, host


class Sigterm:
  """Records SIGTERM (preemption) so the loop can checkpoint and stop."""

  def __init__(self, enabled: bool = True):
    self.received = False
    self._previous = None
    self._enabled = enabled

  def __enter__(self):
    if not self._enabled:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing at the next step.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preemption:
  """Says at which step to stop. One process: on SIGTERM (our handler).
  Several: JAX's preemption service (it handles SIGTERM itself) makes every
  process stop at the same step."""

  def __init__(self, latest: ocp.CheckpointManager):
    self._latest = latest
    self._multi = jax.process_count() > 1
    self._sigterm = Sigterm(enabled=not self._multi)

  def __enter__(self):
    self._sigterm.__enter__()
    return self

  def __exit__(self, *exc):
    self._sigterm.__exit__(*exc)

  @property
  def received(self) -> bool:
    """A SIGTERM arrived (one process)."""
    return not self._multi and self._sigterm.received

  def at(self, step: int) -> bool:
    if self._multi:
      return self._latest.reached_preemption(step)
    return self._sigterm.received

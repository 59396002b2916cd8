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
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from divita_jax import hosts

LATEST, BEST = "checkpoints", "best"


class Preempted(Exception):
  """Training stopped on SIGTERM / SIGINT after a checkpoint at `step`."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    name = signal.Signals(signum).name
    super().__init__(f"{name}: checkpoint at step {step} written.")
    self.step = step
    self.signum = signum


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


def managers(fold_dir: str, read_only: bool = False):
  """(latest, best): latest keeps two, so a broken newest falls back.

  read_only: for commands that only read a workdir (nothing is created).
  """
  out = []
  for sub, item, keep in ((LATEST, "state", 2), (BEST, "variables", 1)):
    out.append(
      ocp.CheckpointManager(
        os.path.join(fold_dir, sub),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=keep,
          enable_async_checkpointing=False,
          create=not read_only,
          read_only=read_only,
        ),
        item_handlers={
          item: _tree_handler(),
          "host": ocp.JsonCheckpointHandler(),
        },
      )
    )
  return tuple(out)


class ConfigMismatch(ValueError):
  """A checkpoint whose tree does not fit the config (another config's)."""


def _paths(tree) -> dict[str, tuple]:
  """'/'-joined key path -> shape, for dicts and dataclass nodes alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
      for k in path
    ]
    out["/".join(keys)] = tuple(getattr(leaf, "shape", ()))
  return out


def check_fits(saved_tree, abstract, where: str) -> None:
  """Raises ConfigMismatch naming the differences of the two trees."""
  saved, want = _paths(saved_tree), _paths(abstract)
  if saved == want:
    return
  diff = sorted(set(saved) ^ set(want))
  diff += [
    f"{k}: {saved[k]} vs {want[k]}"
    for k in saved
    if k in want and saved[k] != want[k]
  ]
  raise ConfigMismatch(
    f"{where} was written by a different config: {len(diff)} parameter(s) "
    f"differ (first: {diff[:3]}). Use a new --workdir for the new config "
    "(or --overwrite, which moves the old results aside)."
  )


def _move_aside(mngr, step: int) -> str:
  """Renames a damaged step folder out of the manager's sight."""
  src = os.path.join(str(mngr.directory), str(step))
  root = os.path.join(os.path.dirname(str(mngr.directory)), "damaged")
  os.makedirs(root, exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dst = os.path.join(
    root, f"{os.path.basename(str(mngr.directory))}-{step}-{stamp}"
  )
  os.rename(src, dst)
  mngr.reload()
  return dst


def restore(mngr, item: str, abstract, read_only: bool = False):
  """Newest readable checkpoint (item, host dict), or (None, None).

  A checkpoint whose files are unreadable (truncated by a full disk, a
  crash) is reported and skipped for the previous one; unless `read_only`,
  it is moved aside to `<fold>/damaged/` (never deleted). A readable
  checkpoint of another config's tree raises ConfigMismatch.
  """
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  for step in sorted(hosts.agree_steps(mngr.all_steps()), reverse=True):
    where = f"Checkpoint {mngr.directory}/{step}"
    try:
      saved = mngr.item_metadata(step)[item].tree
    except Exception as e:  # noqa: BLE001 - unreadable metadata.
      _damaged(mngr, step, e, read_only)
      continue
    check_fits(saved, abstract, where)
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
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files.
      _damaged(mngr, step, e, read_only)
  return None, None


def _damaged(mngr, step: int, error: Exception, read_only: bool) -> None:
  action = "left in place (read-only)"
  if not read_only:
    action = f"moved to {_move_aside(mngr, step)}"
  logging.warning(
    "Checkpoint %d in %s is unreadable (%s: %s); %s, falling back to the "
    "previous one.",
    step,
    mngr.directory,
    type(error).__name__,
    error,
    action,
  )


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
  _, best = managers(fold_dir, read_only=True)
  step = best.latest_step()
  if step is None:
    raise FileNotFoundError(f"No best checkpoint under {fold_dir}/{BEST}.")
  try:
    host = best.restore(
      step, args=ocp.args.Composite(host=ocp.args.JsonRestore())
    )["host"]
  except Exception as e:  # noqa: BLE001 - truncated or corrupt files.
    raise ValueError(
      f"The best checkpoint {best.directory}/{step} is unreadable "
      f"({type(e).__name__}: {e}); it was left as it is."
    ) from e
  abstract = abstract_variables(host["num_features"])
  variables, host = restore(best, "variables", abstract, read_only=True)
  if variables is None:
    raise ValueError(
      f"The best checkpoint under {fold_dir}/{BEST} is unreadable."
    )
  return variables, host


class Sigterm:
  """Records SIGTERM (preemption) or SIGINT (Ctrl-C) so the loop can
  checkpoint at the next step and stop."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.received = None  # The signal number, once one arrived.
    self._previous = {}
    self._enabled = enabled

  def __enter__(self):
    if not self._enabled:
      return self
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    logging.warning("%s received: checkpointing at the next step.", name)
    self.received = signum

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


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
    """A SIGTERM or SIGINT arrived (one process)."""
    return not self._multi and self._sigterm.received is not None

  @property
  def signum(self) -> int:
    return self._sigterm.received or signal.SIGTERM

  def at(self, step: int) -> bool:
    if self._multi:
      return self._latest.reached_preemption(step)
    return self._sigterm.received is not None

"""DIViTA head training on clip representations: one fold of the protocol.

Protocol (reference): BCE on logits; AdamW (decoupled weight decay) with
AMSGrad as in PyTorch; reduce-on-plateau and early stopping on validation
loss; the best-validation checkpoint is evaluated on validation and test.

Reduce-on-plateau is host-side state (PyTorch's `ReduceLROnPlateau`
semantics: mode min, relative threshold, no cooldown) updated once per epoch
from the validation loss; the learning rate reaches the optimizer through
`optax.inject_hyperparams` as an argument of the jitted step, so no
recompilation happens when it changes. (`optax.contrib.reduce_on_plateau`
reacts to the loss it is given at every update, not to an epoch's
validation loss.)

Validation loss: BCE between each trailer's window-averaged probabilities
and its labels, averaged over trailers and genres (the quantity that is
scored), with PyTorch's log clamp at -100.

Layout under `<workdir>/fold<k>`: `checkpoints/` (latest two: train state,
host state and input-iterator state together), `best/` (variables of the best
validation epoch), TensorBoard events. Rerunning with the same workdir
resumes from the latest checkpoint and reproduces an uninterrupted run
exactly; a finished fold is only re-evaluated. SIGTERM saves a checkpoint at
the current step and exits with status 143.
"""

import dataclasses
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from divita_jax import metrics as metrics_lib
from divita_jax import rep_pipeline, sharding
from divita_jax.input_pipeline import global_batch
from divita_jax.models import divita

# ---------------------------------------------------------------- optimizer


class AmsgradState(flax.struct.PyTreeNode):
  count: jax.Array
  mu: any
  nu: any
  nu_max: any


def scale_by_adam_torch(b1, b2, eps, amsgrad) -> optax.GradientTransformation:
  """PyTorch Adam(W) moments: AMSGrad keeps the max of the raw second moment
  and bias-corrects it afterwards (optax's `scale_by_amsgrad` corrects first).
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else nu
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = jnp.sqrt(1 - b2 ** count.astype(jnp.float32))
    updates = jax.tree.map(
      lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps), mu, nu_max
    )
    return updates, AmsgradState(count, mu, nu, nu_max)

  return optax.GradientTransformation(init, update)


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW(+AMSGrad) with an injectable learning rate."""

  @optax.inject_hyperparams
  def adamw(learning_rate):
    return optax.chain(
      scale_by_adam_torch(tc.b1, tc.b2, tc.eps, tc.amsgrad),
      optax.add_decayed_weights(tc.weight_decay),
      optax.scale_by_learning_rate(learning_rate),
    )

  return adamw(learning_rate=tc.learning_rate)


# ------------------------------------------------------ plateau, early stop


def plateau_update(state: dict, val_loss: float, tc) -> dict:
  """PyTorch ReduceLROnPlateau (min, rel threshold, cooldown 0, eps 1e-8)."""
  best, bad, lr = state["best"], state["bad"], state["lr"]
  if best is None or val_loss < best * (1 - tc.plateau_threshold):
    best, bad = val_loss, 0
  else:
    bad += 1
  if bad > tc.plateau_patience:
    new_lr = lr * tc.plateau_factor
    if lr - new_lr > 1e-8:
      lr = new_lr
    bad = 0
  return {"best": best, "bad": bad, "lr": lr}


def early_stop_update(state: dict, val_loss: float) -> dict:
  """Early stopping with min delta 0; `improved` marks a new best epoch."""
  best, wait = state["best"], state["wait"]
  improved = best is None or val_loss < best
  if improved:
    best, wait = val_loss, 0
  else:
    wait += 1
  return {"best": best, "wait": wait, "improved": improved}


# ------------------------------------------------------------ model, state


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: any
  batch_stats: any
  opt_state: any
  rng: jax.Array


def make_model(config) -> nn.Module:
  m = config.model
  return divita.DIViTA(
    branches=tuple(m.branches),
    fusion=m.fusion,
    cam=m.cam,
    mask_padding=m.mask_padding,
    num_classes=m.num_classes,
    dtype=jnp.float32,
  )


def _dummy_inputs(config, num_features: dict):
  clips = config.train.num_clips
  inputs = {
    b: jnp.zeros((2, clips, num_features[b]), jnp.float32)
    for b in config.model.branches
  }
  return inputs, jnp.ones((2, clips), bool)


def _unbox(tree):
  """Drops `nn.Partitioned` boxes (shardings come from out_shardings)."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def state_shardings(config, model, tx, mesh, num_features: dict):
  """(init fn, abstract state, shardings) by the big_vision recipe:

  eval_shape(init) -> logical partition specs -> NamedShardings via the
  config's axis rules.
  """

  def init(rng):  # Keeps nn.Partitioned boxes: they carry the logical axes.
    k_params, k_dropout, k_train = jax.random.split(rng, 3)
    variables = model.init(
      {"params": k_params, "dropout": k_dropout},
      *_dummy_inputs(config, num_features),
      train=False,
    )
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(variables["params"]),
      rng=k_train,
    )

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = sharding.logical_rules(config.mesh)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    _unbox(abstract),
    shardings,
  )
  return init, abstract, shardings


# ------------------------------------------------------------- step fns


def bce(logits, labels):
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def train_step(model, tx, state: TrainState, batch: dict, lr):
  """One AdamW step; returns the new state and the batch loss."""
  rng = jax.random.fold_in(state.rng, state.step)
  inputs = {b: batch[b] for b in model.branches}

  def loss_fn(params):
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      inputs,
      batch["mask"],
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    return bce(logits, batch["labels"]), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  # The host-side plateau schedule sets the learning rate of this step.
  opt_state = state.opt_state._replace(
    hyperparams={**state.opt_state.hyperparams, "learning_rate": lr}
  )
  tx_updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, tx_updates)
  new = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=updates.get("batch_stats", {}),
    opt_state=opt_state,
  )
  return new, loss


def eval_step(model, variables: dict, batch: dict):
  """Sigmoid probabilities [b, classes] of eval windows."""
  inputs = {b: batch[b] for b in model.branches}
  logits = model.apply(variables, inputs, batch["mask"], train=False)
  return jax.nn.sigmoid(logits.astype(jnp.float32))


def compile_steps(model, tx, mesh, shardings):
  """(train_step, eval_step) jitted with explicit shardings; state donated."""
  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(
    functools.partial(train_step, model, tx),
    in_shardings=(shardings, batch, rep),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )
  var_shardings = {
    "params": shardings.params,
    "batch_stats": shardings.batch_stats,
  }
  # Replicated output: every process sees every window's probabilities.
  evaluate = jax.jit(
    functools.partial(eval_step, model),
    in_shardings=(var_shardings, batch),
    out_shardings=rep,
  )
  return train, evaluate


class Programs(NamedTuple):
  """Model, optimizer and jitted programs of one config on one mesh."""

  model: nn.Module
  tx: optax.GradientTransformation
  init: Callable  # rng -> sharded TrainState
  abstract: TrainState  # ShapeDtypeStructs with shardings
  shardings: TrainState  # NamedShardings
  train_step: Callable  # (state, batch, lr) -> (state, loss); donates state
  eval_step: Callable  # (variables, batch) -> probabilities, replicated


_PROGRAMS = {}


def programs(config, mesh, num_features: dict) -> Programs:
  """Cached per process, so every fold (and predict) compiles once."""
  key = (
    config.model.to_json(),
    config.train.to_json(),
    sharding.logical_rules(config.mesh),
    mesh,
    tuple(sorted(num_features.items())),
  )
  if key not in _PROGRAMS:
    model, tx = make_model(config), make_optimizer(config.train)
    init_boxed, abstract, shardings = state_shardings(
      config, model, tx, mesh, num_features
    )
    init = jax.jit(lambda r: _unbox(init_boxed(r)), out_shardings=shardings)
    train_fn, eval_fn = compile_steps(model, tx, mesh, shardings)
    _PROGRAMS[key] = Programs(
      model, tx, init, abstract, shardings, train_fn, eval_fn
    )
  return _PROGRAMS[key]


# --------------------------------------------------------------- evaluation


def trailer_probs(eval_fn, variables, data, mesh, branches, num_trailers):
  """Window probabilities averaged per trailer: [num_trailers, classes]."""
  it = rep_pipeline.iterate(data.dataset)
  probs = []
  for _ in range(data.num_steps):
    batch = next(it)
    inputs = {k: batch[k] for k in (*branches, "mask")}
    probs.append(np.asarray(eval_fn(variables, global_batch(inputs, mesh))))
  probs = np.concatenate(probs)  # [padded windows, classes]
  return metrics_lib.average_windows(probs, data.windows[:, 0], num_trailers)


def bce_probs(probs: np.ndarray, labels: np.ndarray) -> float:
  """Mean BCE of probabilities, log clamped at -100 as PyTorch's BCELoss."""
  probs = np.asarray(probs, np.float64)
  log_p = np.maximum(np.log(np.maximum(probs, 0)), -100)
  log_q = np.maximum(np.log(np.maximum(1 - probs, 0)), -100)
  return float(-np.mean(labels * log_p + (1 - labels) * log_q))


def predict_probs(config, variables, readers: dict, ids) -> np.ndarray:
  """Per-trailer probabilities [len(ids), classes] from `variables`
  ({'params', 'batch_stats'}, e.g. from `load_best`)."""
  mesh = sharding.make_mesh(config.mesh)
  readers = _branch_readers(config, readers)
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  p = programs(config, mesh, num_features)
  variables = jax.device_put(
    {"params": variables["params"], "batch_stats": variables["batch_stats"]},
    _variables(p.shardings),
  )
  labels = np.zeros((len(ids), config.model.num_classes), np.float32)
  data = rep_pipeline.eval_data(
    readers,
    list(ids),
    labels,
    np.arange(len(ids)),
    num_clips=config.train.num_clips,
    global_batch_size=config.train.eval_batch_size,
  )
  return trailer_probs(
    p.eval_step, variables, data, mesh, config.model.branches, len(ids)
  )


# -------------------------------------------------------------- checkpoints


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


def _managers(fold_dir: str):
  """Latest (two kept, so a broken newest falls back) and best managers."""
  managers = []
  for sub, item, keep in (
    ("checkpoints", "state", 2),
    ("best", "variables", 1),
  ):
    managers.append(
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
  return tuple(managers)


def _restore(mngr, item: str, abstract):
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


def _save(mngr, step: int, item: str, tree, host: dict):
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
    # Orbax writes to a temporary folder and renames it when complete, so
    # the previous checkpoints are untouched.
    raise OSError(
      f"Could not write checkpoint step {step} under {mngr.directory} "
      f"({type(e).__name__}: {e}). The previous checkpoints "
      f"{list(mngr.all_steps())} are intact; free space or fix the "
      "permissions and rerun with the same workdir to resume."
    ) from e


def _variables(state):
  return {"params": state.params, "batch_stats": state.batch_stats}


def load_best(config, fold_dir: str):
  """(variables, host info) of the best-validation checkpoint of a fold."""
  _, best = _managers(fold_dir)
  step = best.latest_step()
  if step is None:
    raise FileNotFoundError(f"No best checkpoint under {fold_dir}/best.")
  host = best.restore(
    step, args=ocp.args.Composite(host=ocp.args.JsonRestore())
  )["host"]
  mesh = sharding.make_mesh(config.mesh)
  abstract = programs(config, mesh, host["num_features"]).abstract
  variables, host = _restore(best, "variables", _variables(abstract))
  if variables is None:
    raise ValueError(
      f"The best checkpoint under {fold_dir}/best is unreadable."
    )
  return variables, host


# -------------------------------------------------------------- fold setup


def _branch_readers(config, readers: dict) -> dict:
  missing = [b for b in config.model.branches if b not in readers]
  if missing:
    raise ValueError(
      f"No representation reader for branch(es) {missing}; "
      f"given: {sorted(readers)}."
    )
  return {b: readers[b] for b in config.model.branches}


def fold_subsets(split_assignment, fold: int, num_ids: int) -> dict:
  """{'train'|'validation'|'test': indices} from [N, folds] (or [N]) codes
  0 = train, 1 = validation, 2 = test."""
  split = np.asarray(split_assignment)
  if split.ndim == 2:
    if not 0 <= fold < split.shape[1]:
      raise ValueError(
        f"Fold {fold} not in split_assignment with {split.shape[1]} folds."
      )
    split = split[:, fold]
  if split.shape != (num_ids,):
    raise ValueError(
      f"split_assignment has shape {np.shape(split_assignment)}"
      f" for {num_ids} ids."
    )
  out = {}
  for code, name in enumerate(("train", "validation", "test")):
    out[name] = np.flatnonzero(split == code)
    if not len(out[name]):
      raise ValueError(f"Fold {fold} has an empty {name} subset.")
  return out


class _Sigterm:
  """Records SIGTERM (preemption) so the loop can checkpoint and exit."""

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


def _initial_host(config, num_features: dict) -> dict:
  return {
    "epochs_done": 0,  # Epochs with their validation done.
    "done": False,  # Training finished (max epochs or early stop).
    "plateau": {"best": None, "bad": 0, "lr": config.train.learning_rate},
    "early_stop": {"best": None, "wait": 0},
    "best_epoch": None,
    "train_loss_sum": 0.0,  # Of the current epoch's finished steps.
    "iterator": None,  # grain iterator state.
    "num_features": num_features,
  }


# --------------------------------------------------------------------- loop


@dataclasses.dataclass
class _Fold:
  """What the epoch loop of one fold works with."""

  mesh: jax.sharding.Mesh
  train_step: callable
  eval_step: callable
  train: rep_pipeline.TrainData
  val: rep_pipeline.EvalData
  val_labels: np.ndarray  # [validation trailers, classes]
  latest: ocp.CheckpointManager
  best: ocp.CheckpointManager
  writer: metric_writers.MetricWriter


def _add(total: float, losses) -> float:
  for loss in losses:  # Sequential, so a resumed epoch sums identically.
    total += float(loss)
  return total


def _end_epoch(config, f: _Fold, state, host: dict, epoch: int, step: int):
  """Validation, plateau and early-stopping updates, best checkpoint."""
  tc = config.train
  probs = trailer_probs(
    f.eval_step,
    _variables(state),
    f.val,
    f.mesh,
    config.model.branches,
    len(f.val_labels),
  )
  val_loss = bce_probs(probs, f.val_labels)
  es = early_stop_update(host["early_stop"], val_loss)
  improved = es.pop("improved")
  scalars = {
    "epoch": epoch + 1,
    "val_loss": val_loss,
    "train_loss": host["train_loss_sum"] / f.train.steps_per_epoch,
    "learning_rate": host["plateau"]["lr"],
  }
  host = {
    **host,
    "epochs_done": epoch + 1,
    "early_stop": es,
    "plateau": plateau_update(host["plateau"], val_loss, tc),
    "train_loss_sum": 0.0,
  }
  if improved:
    host["best_epoch"] = epoch + 1
    _save(
      f.best,
      epoch + 1,
      "variables",
      _variables(state),
      {
        "epoch": epoch + 1,
        "val_loss": val_loss,
        "num_features": host["num_features"],
      },
    )
  f.writer.write_scalars(step, scalars)
  logging.info(
    "Epoch %d: train loss %.5f, val loss %.5f, lr %.2e%s",
    epoch + 1,
    scalars["train_loss"],
    val_loss,
    scalars["learning_rate"],
    " (best)" if improved else "",
  )
  stop = es["wait"] >= tc.early_stop_patience or epoch + 1 == tc.max_epochs
  return host, stop


def _run_epochs(config, f: _Fold, state, host: dict):
  """Trains from the state's step until early stopping or max epochs."""
  tc = config.train
  steps = f.train.steps_per_epoch
  step = int(state.step)
  progress = periodic_actions.ReportProgress(
    num_train_steps=steps * tc.max_epochs,
    writer=f.writer,
    every_steps=tc.log_every_steps,
    every_secs=None,
  )
  # One process: our SIGTERM handler. Several: JAX's preemption service
  # (it handles SIGTERM itself) makes every process stop at the same step.
  multi = jax.process_count() > 1
  with _Sigterm(enabled=not multi) as sigterm:
    it = rep_pipeline.iterate(f.train.dataset, state=host["iterator"])
    preempted = False
    for epoch in range(host["epochs_done"], tc.max_epochs):
      losses = []
      while step < (epoch + 1) * steps:
        batch = global_batch(next(it), f.mesh)
        lr = np.float32(host["plateau"]["lr"])
        state, loss = f.train_step(state, batch, lr)
        step += 1
        losses.append(loss)
        progress(step)
        if step % tc.log_every_steps == 0:
          f.writer.write_scalars(step, {"train_loss_step": float(loss)})
        preempted = (
          f.latest.reached_preemption(step) if multi else sigterm.received
        )
        if preempted and step < (epoch + 1) * steps:
          host = {
            **host,
            "iterator": it.get_state(),
            "train_loss_sum": _add(host["train_loss_sum"], losses),
          }
          _save(f.latest, step, "state", state, host)
          _exit_preempted(f.writer, step)
      host = {
        **host,
        "train_loss_sum": _add(host["train_loss_sum"], losses),
        "iterator": it.get_state(),
      }
      host, stop = _end_epoch(config, f, state, host, epoch, step)
      host["done"] = stop
      preempted = preempted or (not multi and sigterm.received)
      if stop or preempted or (epoch + 1) % tc.checkpoint_every_epochs == 0:
        _save(f.latest, step, "state", state, host)
      if preempted and not stop:
        _exit_preempted(f.writer, step)
      if stop:
        break
  return state, host


def _exit_preempted(writer, step: int):
  writer.flush()
  logging.warning("Preempted: checkpoint at step %d written; exiting.", step)
  sys.exit(128 + signal.SIGTERM)


# ------------------------------------------------------------------- fold


def train_fold(
  config,
  workdir: str,
  readers: dict,
  ids,
  labels,
  split_assignment,
  fold: int,
  preload: bool = True,
) -> dict:
  """Trains and evaluates one fold in `workdir` (the fold's own directory;
  resumes from it). `split_assignment` is [N, folds] (or [N]) of 0 = train,
  1 = validation, 2 = test.

  `preload` loads the representations of the fold's trailers into memory
  first (unless the readers already are `rep_pipeline.InMemoryReader`s):
  ~7 GB at Trailers12k scale, and the only way zarr groups keep up with the
  step (benchmarks/head.py). Every process then holds all of them, since
  its share of each global batch changes every epoch; `preload=False`
  reads per batch (memory-mapped for our NpyStore), only the own share.

  Returns 'epoch' (best epoch, 1-based), 'val'/'test' (metrics of the best
  checkpoint), 'val_probs'/'test_probs' (per trailer) and 'val_ids'/
  'test_ids'.
  """
  tc = config.train
  fold_dir = workdir
  ids, labels = list(ids), np.asarray(labels, np.float32)
  subsets = fold_subsets(split_assignment, fold, len(ids))
  readers = _branch_readers(config, readers)
  in_memory = all(
    isinstance(r, rep_pipeline.InMemoryReader) for r in readers.values()
  )
  if preload and not in_memory:
    used = np.concatenate(list(subsets.values()))
    readers = rep_pipeline.preload(readers, [ids[i] for i in np.sort(used)])
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  mesh = sharding.make_mesh(config.mesh)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(tc[name], mesh, f"config.train.{name}")

  p = programs(config, mesh, num_features)
  state = p.init(jax.random.PRNGKey(config.seed))
  writer = metric_writers.create_default_writer(
    fold_dir, just_logging=jax.process_index() > 0
  )
  eval_data = lambda name: rep_pipeline.eval_data(
    readers,
    ids,
    labels,
    subsets[name],
    num_clips=tc.num_clips,
    global_batch_size=tc.eval_batch_size,
  )
  f = _Fold(
    mesh,
    p.train_step,
    p.eval_step,
    rep_pipeline.train_data(
      readers,
      ids,
      labels,
      subsets["train"],
      num_clips=tc.num_clips,
      global_batch_size=tc.batch_size,
      seed=config.seed,
      num_epochs=tc.max_epochs,
    ),
    eval_data("validation"),
    labels[subsets["validation"]],
    *_managers(fold_dir),
    writer,
  )

  restored, host = _restore(f.latest, "state", p.abstract)
  if restored is None:
    host = _initial_host(config, num_features)
    parameter_overview.log_parameter_overview(
      state.params,
      include_stats=jax.process_count() == 1,
      msg=f"Fold {fold} parameters",
    )
  else:
    state = restored
    logging.info(
      "Fold %d: resuming at step %d (%d epochs done).",
      fold,
      int(state.step),
      host["epochs_done"],
    )
  if not host["done"]:
    state, host = _run_epochs(config, f, state, host)
  del state

  variables, best = _restore(f.best, "variables", _variables(p.abstract))
  if variables is None:
    raise ValueError(f"No readable best checkpoint under {fold_dir}/best.")
  out = {"epoch": best["epoch"]}
  for name, key in (("validation", "val"), ("test", "test")):
    data = f.val if name == "validation" else eval_data(name)
    probs = trailer_probs(
      p.eval_step,
      variables,
      data,
      mesh,
      config.model.branches,
      len(subsets[name]),
    )
    out[key] = metrics_lib.compute_metrics(probs, labels[subsets[name]])
    out[f"{key}_probs"] = probs
    out[f"{key}_ids"] = [ids[i] for i in subsets[name]]
    writer.write_scalars(
      best["epoch"], {f"best_{key}/{k}": v for k, v in out[key].items()}
    )
  writer.flush()
  return out

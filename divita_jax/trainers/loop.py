"""DIViTA head training on clip representations: one fold of the protocol.

Protocol (reference): BCE on logits; AdamW with AMSGrad, reduce-on-plateau
and early stopping on validation loss (optim.py); the best-validation
checkpoint is evaluated on validation and test (evaluate.py).

The file reads in run order: train state and its shardings (big_vision's
recipe: eval_shape(init) -> logical specs -> NamedShardings), the jitted
steps, the compiled programs, `train_fold` (what a fold does, from where it
starts) and the epoch loop.

A fold's folder holds its checkpoints (checkpoints.py) and TensorBoard
events. A rerun resumes from the latest checkpoint and reproduces an
uninterrupted run exactly; a finished fold is only re-evaluated.
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

import tfds_trailers12k
from divita_jax import (
  evaluate,
  hosts,
  sharding,
)
from divita_jax import metrics as metrics_lib
from divita_jax.models import divita
from divita_jax.pipelines import reps
from divita_jax.trainers import checkpoints, finetune, optim
from divita_jax.trainers.state import (  # noqa: F401 - public here too.
  Programs,
  TrainState,
  bce,
  jit_steps,
  variables_of,
  with_shardings,
)
from tfds_trailers12k import genres

# ------------------------------------------------------------ model, state


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
  return init, with_shardings(abstract, shardings), shardings


def abstract_variables(config, num_features: dict) -> dict:
  """The variables' abstract tree with shardings (restore target)."""
  mesh = sharding.make_mesh(config.mesh)
  return variables_of(programs(config, mesh, num_features).abstract)


# ------------------------------------------------------------- step fns


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
  """Eval windows -> {'probs' [b, C], 'bce' [b] (window BCE vs its
  trailer's labels), 'trailer' [b] (carried through, see evaluate.py)}."""
  inputs = {b: batch[b] for b in model.branches}
  logits = model.apply(variables, inputs, batch["mask"], train=False)
  logits = logits.astype(jnp.float32)
  return {
    "probs": jax.nn.sigmoid(logits),
    "bce": optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(-1),
    "trailer": batch["trailer"],
  }


def compile_steps(model, tx, mesh, shardings):
  """(train_step, eval_step) jitted with explicit shardings; state donated."""
  return jit_steps(
    functools.partial(train_step, model, tx),
    functools.partial(eval_step, model),
    mesh,
    shardings,
  )


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
    model, tx = make_model(config), optim.make_optimizer(config.train)
    init_boxed, abstract, shardings = state_shardings(
      config, model, tx, mesh, num_features
    )
    init = jax.jit(
      lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings
    )
    train_fn, eval_fn = compile_steps(model, tx, mesh, shardings)
    _PROGRAMS[key] = Programs(
      model, tx, init, abstract, shardings, train_fn, eval_fn
    )
  return _PROGRAMS[key]


# -------------------------------------------------------------- fold setup


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


# ------------------------------------------------------------------- fold


def train_fold(
  config,
  fold_dir: str,
  readers: dict,
  ids,
  labels,
  split_assignment,
  fold: int,
  preload: bool = True,
) -> dict:
  """Trains and evaluates one fold in `fold_dir` (the fold's own folder;
  resumes from it). `split_assignment` is [N, 3] of 0 = train,
  1 = validation, 2 = test. `readers`: branch -> representation reader;
  with `train.mode = "finetune"` the random-access source of the raw
  trailers instead (`tfds_trailers12k.data_source`, rows aligned with
  `ids`).

  `preload` loads the fold's representations into memory first (~7 GB at
  Trailers12k scale; every process holds all, as its share of each global
  batch changes every epoch); `preload=False` reads per batch, only the
  own share (benchmarks/head.py compares them).

  Returns 'epoch' (best epoch, 1-based), 'val'/'test' (metrics of the best
  checkpoint), 'val_probs'/'test_probs' (per trailer) and 'val_ids'/
  'test_ids'.
  """
  ids, labels = list(ids), np.asarray(labels, np.float32)
  subsets = {
    n: tfds_trailers12k.subset_indices(split_assignment, fold, n)
    for n in genres.SUBSETS
  }
  for name in (n for n, v in subsets.items() if not len(v)):
    raise ValueError(f"Fold {fold} has an empty {name} subset.")
  mesh = sharding.make_mesh(config.mesh)
  for name in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(config.train[name], mesh, f"config.train.{name}")
  p, train_data, eval_data, num_features = _fold_inputs(
    config, mesh, readers, ids, labels, subsets, preload
  )
  # Start point: the fold's latest readable checkpoint (resume), else init
  # from config.seed (no pretrained head). First, so that a checkpoint of
  # another config stops the run before anything is written.
  latest, best = checkpoints.managers(fold_dir)
  state, host = checkpoints.restore(latest, "state", p.abstract)
  f = _Fold(
    mesh,
    p.train_step,
    p.eval_step,
    train_data,
    eval_data("validation"),
    labels[subsets["validation"]],
    latest,
    best,
    # TensorBoard only: the console gets one line per epoch (_end_epoch).
    metric_writers.SummaryWriter(fold_dir)
    if jax.process_index() == 0
    else metric_writers.MultiWriter([]),
  )
  if state is None:
    state = p.init(jax.random.PRNGKey(config.seed))
    host = _initial_host(config, num_features)
    parameter_overview.log_parameter_overview(
      state.params,
      include_stats=jax.process_count() == 1,
      msg=f"Fold {fold} parameters",
    )
  else:
    logging.info(
      "Fold %d: resuming at step %d (%d epochs done).",
      fold,
      int(state.step),
      host["epochs_done"],
    )
  if not host["done"]:
    state, host = _run_epochs(config, f, state, host)
  del state
  test = {"test": eval_data("test"), "val": f.val}
  return _evaluate_best(config, p, f, fold_dir, test, ids, labels, subsets)


def _fold_inputs(config, mesh, readers, ids, labels, subsets, preload):
  """(programs, train data, subset name -> eval data, num_features) of the
  config's mode: representations (frozen) or decoded clips (finetune)."""
  mode = config.train.mode
  if mode == "finetune":
    p = finetune.programs(config, mesh)
    train, eval_data = finetune.fold_data(config, readers, ids, labels, subsets)
    return p, train, eval_data, {}
  if mode != "frozen":
    raise ValueError(
      f"Unknown config.train.mode {mode!r}; {' | '.join(finetune.MODES)}."
    )
  readers = evaluate.branch_readers(config, readers)
  if preload:
    used = np.sort(np.concatenate(list(subsets.values())))
    readers = reps.preload(readers, [ids[i] for i in used])
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  tc = config.train
  eval_data = lambda name: reps.eval_data(
    readers,
    ids,
    labels,
    subsets[name],
    num_clips=tc.num_clips,
    global_batch_size=tc.eval_batch_size,
  )
  train_data = reps.train_data(
    readers,
    ids,
    labels,
    subsets["train"],
    num_clips=tc.num_clips,
    global_batch_size=tc.batch_size,
    seed=config.seed,
    num_epochs=tc.max_epochs,
  )
  return (
    programs(config, mesh, num_features),
    train_data,
    eval_data,
    num_features,
  )


def _evaluate_best(config, p, f, fold_dir, data, ids, labels, subsets):
  """Metrics and probabilities of the best checkpoint, val and test."""
  variables, best = checkpoints.restore(
    f.best, "variables", variables_of(p.abstract)
  )
  if variables is None:
    raise ValueError(f"No readable best checkpoint under {fold_dir}/best.")
  out = {"epoch": best["epoch"]}
  for name, key in (("validation", "val"), ("test", "test")):
    outputs = evaluate.window_outputs(
      p.eval_step, variables, data[key], f.mesh, config.model.branches
    )
    probs = evaluate.trailer_probs(outputs, len(subsets[name]))
    out[key] = metrics_lib.compute_metrics(probs, labels[subsets[name]])
    out[f"{key}_probs"] = probs
    out[f"{key}_ids"] = [ids[i] for i in subsets[name]]
    f.writer.write_scalars(
      best["epoch"], {f"best_{key}/{k}": v for k, v in out[key].items()}
    )
  f.writer.flush()
  return out


# --------------------------------------------------------------------- loop


@dataclasses.dataclass
class _Fold:
  """What the epoch loop of one fold works with."""

  mesh: jax.sharding.Mesh
  train_step: Callable
  eval_step: Callable
  train: reps.TrainData
  val: reps.EvalData
  val_labels: np.ndarray  # [validation trailers, classes]
  latest: ocp.CheckpointManager
  best: ocp.CheckpointManager
  writer: metric_writers.MetricWriter


def _end_epoch(config, f: _Fold, state, host: dict, epoch: int, step: int):
  """Validation, plateau and early-stopping updates, best checkpoint."""
  tc = config.train
  outputs = evaluate.window_outputs(
    f.eval_step, variables_of(state), f.val, f.mesh, config.model.branches
  )
  probs = evaluate.trailer_probs(outputs, len(f.val_labels))
  val_loss = evaluate.validation_loss(config, outputs, probs, f.val_labels)
  es = optim.early_stop_update(host["early_stop"], val_loss)
  improved = es.pop("improved")
  scalars = {
    "epoch": epoch + 1,
    "val_loss": val_loss,
    "train_loss": host["train_loss_sum"] / f.train.steps_per_epoch,
    "learning_rate": optim.step_lr(
      config, host, step - 1, f.train.steps_per_epoch
    ),
  }
  host = {
    **host,
    "epochs_done": epoch + 1,
    "early_stop": es,
    "plateau": optim.plateau_update(host["plateau"], val_loss, tc),
    "train_loss_sum": 0.0,
  }
  if improved:
    host["best_epoch"] = epoch + 1
    checkpoints.save(
      f.best,
      epoch + 1,
      "variables",
      variables_of(state),
      dict(
        epoch=epoch + 1, val_loss=val_loss, num_features=host["num_features"]
      ),
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
  # Epoch losses are summed in order (sum with a start value), so a resumed
  # epoch sums to the same float as an uninterrupted one.
  with checkpoints.Preemption(f.latest) as preemption:
    it = reps.iterate(f.train.dataset, state=host["iterator"])
    preempted = False
    for epoch in range(host["epochs_done"], tc.max_epochs):
      losses = []
      while step < (epoch + 1) * steps:
        batch = hosts.global_batch(next(it), f.mesh)
        lr = np.float32(optim.step_lr(config, host, step, steps))
        state, loss = f.train_step(state, batch, lr)
        step += 1
        losses.append(loss)
        progress(step)
        if step % tc.log_every_steps == 0:
          f.writer.write_scalars(step, {"train_loss_step": float(loss)})
        preempted = preemption.at(step)
        if preempted and step < (epoch + 1) * steps:
          host = {
            **host,
            "iterator": it.get_state(),
            "train_loss_sum": sum(map(float, losses), host["train_loss_sum"]),
          }
          checkpoints.save(f.latest, step, "state", state, host)
          f.writer.flush()
          raise checkpoints.Preempted(step, preemption.signum)
      host = {
        **host,
        "train_loss_sum": sum(map(float, losses), host["train_loss_sum"]),
        "iterator": it.get_state(),
      }
      host, stop = _end_epoch(config, f, state, host, epoch, step)
      host["done"] = stop
      preempted = preempted or preemption.received
      if stop or preempted or (epoch + 1) % tc.checkpoint_every_epochs == 0:
        checkpoints.save(f.latest, step, "state", state, host)
      if preempted and not stop:
        f.writer.flush()
        raise checkpoints.Preempted(step, preemption.signum)
      if stop:
        break
  return state, host

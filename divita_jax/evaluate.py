"""Evaluation of the head: trailer probabilities from eval windows.

Each trailer is cut into consecutive windows of `num_clips` clips
(reps.eval_data); its probabilities are the mean of its windows'
sigmoid probabilities (the reference's `mean_snippets`).

Validation loss (drives reduce-on-plateau, early stopping and the best
checkpoint): by default the official trainer's, the mean over validation
batches of the windows' BCE (`window_loss`); `train.val_loss = "trailers"`
takes the BCE of trailer-averaged probabilities instead (`trailer_loss`).
The two can pick different epochs.
"""

import jax
import numpy as np

from divita_jax import hosts, sharding
from divita_jax import metrics as metrics_lib
from divita_jax.models import divita
from divita_jax.pipelines import common, reps


def window_outputs(eval_fn, variables, data, mesh, branches) -> dict:
  """Every eval window through the head: {'probs' [W, C], 'bce' [W],
  'trailer' [W]} (trailer -1 = batch padding).

  Each window's trailer index travels through the step with it, so the
  mapping back to trailers does not depend on where the mesh places each
  process's rows (TPU slices interleave processes along the data axis).
  """
  it = common.iterate(data)
  keys = (*branches, "mask", "labels", "trailer")
  out = []
  for _ in range(data.num_steps):
    batch = next(it)
    inputs = hosts.global_batch({k: batch[k] for k in keys}, mesh)
    out.append(jax.tree.map(np.asarray, eval_fn(variables, inputs)))
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _canonical(outputs: dict, *columns) -> dict:
  """Rows sorted by trailer, then content: sums then run in one order
  whatever order the devices returned the rows in (bitwise equal results
  on any mesh)."""
  keys = [np.asarray(c).reshape(len(outputs["trailer"]), -1) for c in columns]
  keys = [k[:, j] for k in keys for j in range(k.shape[1])]
  order = np.lexsort((*keys[::-1], outputs["trailer"]))
  return {k: v[order] for k, v in outputs.items()}


def trailer_probs(outputs: dict, num_trailers: int) -> np.ndarray:
  """Window probabilities averaged per trailer: [num_trailers, classes]."""
  outputs = _canonical(outputs, outputs["probs"])
  return metrics_lib.average_windows(
    outputs["probs"], outputs["trailer"], num_trailers
  )


def window_loss(outputs: dict, batch_size: int) -> float:
  """The official validation loss: the mean over validation batches (of
  `batch_size` trailers, in subset order) of the BCE of every window's
  logits against its trailer's labels, averaged over the batch's windows
  and genres (PyTorch's BCEWithLogitsLoss per batch)."""
  outputs = _canonical(outputs, outputs["bce"])
  keep = outputs["trailer"] >= 0
  bce = np.asarray(outputs["bce"], np.float64)[keep]
  batch = outputs["trailer"][keep] // batch_size
  sums = np.bincount(batch, weights=bce)
  counts = np.bincount(batch)
  return float(np.mean(sums[counts > 0] / counts[counts > 0]))


def trailer_loss(probs: np.ndarray, labels: np.ndarray) -> float:
  """BCE of trailer-averaged probabilities (the scored quantity), averaged
  over trailers and genres, log clamped at -100 as PyTorch's BCELoss."""
  probs = np.asarray(probs, np.float64)
  log_p = np.maximum(np.log(np.maximum(probs, 0)), -100)
  log_q = np.maximum(np.log(np.maximum(1 - probs, 0)), -100)
  return float(-np.mean(labels * log_p + (1 - labels) * log_q))


def validation_loss(config, outputs: dict, probs, labels) -> float:
  """config.train.val_loss: 'windows' (official, default) | 'trailers'."""
  if config.train.val_loss == "trailers":
    return trailer_loss(probs, labels)
  return window_loss(outputs, config.train.batch_size)


def predict_probs(config, programs, variables, readers: dict, ids):
  """Per-trailer probabilities [len(ids), classes] from `variables`
  ({'params', 'batch_stats'}, e.g. from `load_best`); `programs`:
  num_features -> `state.Programs` of the config."""
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  readers = branch_readers(config, readers)
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  p = programs(num_features)
  variables = jax.device_put(
    {"params": variables["params"], "batch_stats": variables["batch_stats"]},
    {"params": p.shardings.params, "batch_stats": p.shardings.batch_stats},
  )
  labels = np.zeros((len(ids), config.model.num_classes), np.float32)
  fold = common.FoldData(ids, labels, {"predict": np.arange(len(ids))})
  batching = common.Batching(config.train.num_clips, tc.eval_batch_size)
  data = reps.eval_data(readers, fold, "predict", batching)
  outputs = window_outputs(
    p.eval_step, variables, data, mesh, config.model.branches
  )
  return trailer_probs(outputs, len(ids))


def branch_probs(config, variables, readers: dict, ids) -> dict:
  """What each branch of a late-fusion head says alone: {branch:
  [len(ids), classes]}, the sigmoid of the branch's own logits (the fused
  logits are their mean) averaged over each trailer's windows."""
  names = tuple(config.model.branches)
  model = divita.make_head(config.model)
  only = lambda m, method: method == "__call__" and m.name in names
  readers = branch_readers(config, readers)

  @jax.jit
  def probs(variables, batch):
    _, state = model.apply(
      variables,
      {b: batch[b] for b in names},
      batch["mask"],
      False,
      capture_intermediates=only,
    )
    return {
      b: jax.nn.sigmoid(state["intermediates"][b]["__call__"][0]) for b in names
    }

  labels = np.zeros((len(ids), config.model.num_classes), np.float32)
  fold = common.FoldData(ids, labels, {"predict": np.arange(len(ids))})
  batching = common.Batching(
    config.train.num_clips, config.train.eval_batch_size
  )
  data = reps.eval_data(readers, fold, "predict", batching)
  it = common.iterate(data)
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  out, trailer = {b: [] for b in names}, []
  for _ in range(data.num_steps):
    batch = next(it)
    for b, p in probs(variables, batch).items():
      out[b].append(np.asarray(p))
    trailer.append(np.asarray(batch["trailer"]))
  trailer = np.concatenate(trailer)
  return {
    b: metrics_lib.average_windows(np.concatenate(p), trailer, len(ids))
    for b, p in out.items()
  }


def branch_readers(config, readers: dict) -> dict:
  missing = [b for b in config.model.branches if b not in readers]
  if missing:
    raise ValueError(
      f"No representation reader for branch(es) {missing}; "
      f"given: {sorted(readers)}."
    )
  return {b: readers[b] for b in config.model.branches}

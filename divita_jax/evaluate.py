"""Evaluation of the head: trailer probabilities from eval windows.

Each trailer is cut into consecutive windows of `num_clips` clips
(rep_pipeline.eval_data); its probabilities are the mean of its windows'
sigmoid probabilities (the reference's `mean_snippets`).

Validation loss: BCE between each trailer's window-averaged probabilities
and its labels, averaged over trailers and genres (the quantity that is
scored), with PyTorch's log clamp at -100.
"""

import jax
import numpy as np

from divita_jax import hosts, rep_pipeline, sharding
from divita_jax import metrics as metrics_lib


def trailer_probs(eval_fn, variables, data, mesh, branches, num_trailers):
  """Window probabilities averaged per trailer: [num_trailers, classes]."""
  it = rep_pipeline.iterate(data.dataset)
  probs = []
  for _ in range(data.num_steps):
    batch = next(it)
    inputs = {k: batch[k] for k in (*branches, "mask")}
    probs.append(
      np.asarray(eval_fn(variables, hosts.global_batch(inputs, mesh)))
    )
  probs = np.concatenate(probs)  # [padded windows, classes]
  return metrics_lib.average_windows(probs, data.windows[:, 0], num_trailers)


def bce_probs(probs: np.ndarray, labels: np.ndarray) -> float:
  """Mean BCE of probabilities, log clamped at -100 as PyTorch's BCELoss."""
  probs = np.asarray(probs, np.float64)
  log_p = np.maximum(np.log(np.maximum(probs, 0)), -100)
  log_q = np.maximum(np.log(np.maximum(1 - probs, 0)), -100)
  return float(-np.mean(labels * log_p + (1 - labels) * log_q))


def predict_probs(config, programs, variables, readers: dict, ids):
  """Per-trailer probabilities [len(ids), classes] from `variables`
  ({'params', 'batch_stats'}, e.g. from `load_best`); `programs`:
  num_features -> `train.Programs` of the config."""
  mesh = sharding.make_mesh(config.mesh)
  readers = branch_readers(config, readers)
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  p = programs(num_features)
  variables = jax.device_put(
    {"params": variables["params"], "batch_stats": variables["batch_stats"]},
    {"params": p.shardings.params, "batch_stats": p.shardings.batch_stats},
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


def branch_readers(config, readers: dict) -> dict:
  missing = [b for b in config.model.branches if b not in readers]
  if missing:
    raise ValueError(
      f"No representation reader for branch(es) {missing}; "
      f"given: {sorted(readers)}."
    )
  return {b: readers[b] for b in config.model.branches}

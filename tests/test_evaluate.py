"""Validation loss as the official trainer computes it; trailer mapping."""

import jax
import numpy as np
import torch

from divita_jax import evaluate, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.pipelines import common, reps, stores
from divita_jax.trainers import frozen
from divita_jax.trainers import state as train_state

CLIPS = 4  # Clips per window.
LENGTHS = (9, 3, 4, 6, 5)  # Windows: 3, 1, 1, 2, 2 (last ones padded).


def _problem():
  rng = np.random.default_rng(0)
  ids = [f"t{i}" for i in range(len(LENGTHS))]
  feats = {"image": 6, "video": 4}
  readers = {
    b: stores.MemoryStore(
      {i: rng.normal(size=(n, d)) for i, n in zip(ids, LENGTHS)}
    )
    for b, d in feats.items()
  }
  labels = (rng.random((len(ids), 10)) < 0.4).astype(np.float32)
  config = divita_config.get_config()
  config.model.cam = "tsfm_8_2_2_0.0"
  config.model.mask_padding = False  # The reference's zero-padded windows.
  config.train.num_clips = CLIPS
  config.train.batch_size = 2  # Trailers per validation batch.
  config.train.eval_batch_size = 8  # Windows per step: they mix trailers.
  return config, readers, ids, labels, feats


def _official_loss(model, variables, readers, ids, labels, batch_size):
  """The reference: per batch of trailers, BCEWithLogitsLoss over all the
  batch's windows (consecutive, the last zero-padded); mean over batches."""
  losses = []
  for start in range(0, len(ids), batch_size):
    xs, ys = {b: [] for b in readers}, []
    for t in range(start, min(start + batch_size, len(ids))):
      n = LENGTHS[t]
      for w in range(0, n, CLIPS):
        for b, r in readers.items():
          window = np.zeros((CLIPS, r.num_features), np.float32)
          part = r.read(ids[t])[w : w + CLIPS]
          window[: len(part)] = part
          xs[b].append(window)
        ys.append(labels[t])
    inputs = {b: np.stack(x) for b, x in xs.items()}
    mask = np.ones((len(ys), CLIPS), bool)
    logits = model.apply(variables, inputs, mask, False)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
      torch.from_numpy(np.asarray(logits, np.float32)),
      torch.from_numpy(np.stack(ys)),
    )
    losses.append(float(loss))
  return float(np.mean(losses))


def test_window_loss_is_the_official_validation_loss():
  config, readers, ids, labels, feats = _problem()
  mesh = sharding.make_mesh(config.mesh)
  p = frozen.programs(config, mesh, feats)
  state = p.init(jax.random.PRNGKey(0))
  variables = train_state.variables_of(state)
  fold = common.FoldData(ids, labels, {"all": np.arange(len(ids))})
  batching = common.Batching(CLIPS, config.train.eval_batch_size)
  data = reps.eval_data(readers, fold, "all", batching)
  outputs = evaluate.window_outputs(
    p.eval_step, variables, data, mesh, config.model.branches
  )
  assert (outputs["trailer"] >= 0).sum() == 9  # Windows of all trailers.
  want = _official_loss(
    p.model, variables, readers, ids, labels, config.train.batch_size
  )
  probs = evaluate.trailer_probs(outputs, len(ids))
  got = evaluate.validation_loss(config, outputs, probs, labels)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The other definition is another number (they can pick other epochs).
  config.train.val_loss = "trailers"
  other = evaluate.validation_loss(config, outputs, probs, labels)
  assert abs(other - want) > 1e-4
  assert other == evaluate.trailer_loss(probs, labels)


def test_trailer_probs_follow_the_carried_trailer_index():
  # Rows in any order (as an interleaved mesh returns them) average to the
  # same trailer probabilities: the mapping travels with the rows.
  rng = np.random.default_rng(1)
  outputs = {
    "probs": rng.random((8, 10)),
    "bce": rng.random(8),
    "trailer": np.array([0, 0, 1, 2, 2, 2, -1, -1]),
  }
  order = np.array([4, 0, 6, 2, 1, 7, 5, 3])
  shuffled = {k: v[order] for k, v in outputs.items()}
  np.testing.assert_array_equal(
    evaluate.trailer_probs(shuffled, 3), evaluate.trailer_probs(outputs, 3)
  )
  assert evaluate.window_loss(shuffled, 2) == evaluate.window_loss(outputs, 2)

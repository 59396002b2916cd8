"""What a training step carries, for both modes of the trainer.

`TrainState` is the jitted steps' state (head-only training, train.py, and
end-to-end fine-tuning, finetune.py); `Programs` is what either mode
compiles for a config on a mesh, so the epoch loop, checkpoints and
evaluation in train.py / evaluate.py serve both.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


class Programs(NamedTuple):
  """Model, optimizer and jitted programs of one config on one mesh."""

  model: Any  # The head module (frozen mode) or finetune.Model.
  tx: optax.GradientTransformation
  init: Callable  # rng -> sharded TrainState
  abstract: TrainState  # ShapeDtypeStructs with shardings
  shardings: TrainState  # NamedShardings
  train_step: Callable  # (state, batch, lr) -> (state, loss); donates state
  eval_step: Callable  # (variables, batch) -> window outputs, replicated


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def bce(logits, labels):
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

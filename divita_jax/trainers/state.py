"""What a training step carries, for both modes of the trainer.

`TrainState` is the jitted steps' state (head-only training, train.py, and
end-to-end fine-tuning, finetune.py); `Programs` is what either mode
compiles for a config on a mesh, so the epoch loop, checkpoints and
evaluation in train.py / evaluate.py serve both.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import optax

from divita_jax import sharding


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


def with_shardings(abstract_boxed, shardings):
  """The unboxed abstract tree as ShapeDtypeStructs carrying `shardings`
  (restore targets, `.lower()` arguments)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.meta.unbox(abstract_boxed),
    shardings,
  )


def jit_steps(train_step, eval_step, mesh, shardings: TrainState):
  """(train_step(state, batch, lr), eval_step(variables, batch)) jitted
  with explicit shardings: batches split over the batch axes, the state
  donated, eval outputs replicated (every process sees every window)."""
  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(
    train_step,
    in_shardings=(shardings, batch, rep),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )
  var_shardings = {
    "params": shardings.params,
    "batch_stats": shardings.batch_stats,
  }
  evaluate = jax.jit(
    eval_step, in_shardings=(var_shardings, batch), out_shardings=rep
  )
  return train, evaluate

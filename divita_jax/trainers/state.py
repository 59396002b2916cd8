"""What a training step carries, for both modes of the trainer.

`TrainState` is the jitted steps' state (head-only training, frozen.py, and
end-to-end fine-tuning, finetune.py); `Programs` is what either mode
compiles for a config on a mesh (built once per process: `cached`), so the
epoch loop, checkpoints and evaluation in loop.py / evaluate.py serve both.
The pieces both modes' steps share live here too: the learning-rate
injection, the step metrics and the evaluation outputs.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

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
  # (state, batch, lr) -> (state, {'loss', 'grad_norm', 'param_norm'});
  # donates the state.
  train_step: Callable
  eval_step: Callable  # (variables, batch) -> window outputs, replicated
  # (state, batches [K, b, ...], lrs [K]) -> (state, metrics [K]): K steps
  # in one dispatch (lax.scan of train_step, bitwise the same as K calls of
  # it); donates the state. None: one dispatch per step (finetune).
  train_steps: Callable | None = None


class FoldSetup(NamedTuple):
  """What a mode gives the fold loop for one fold."""

  programs: Programs
  train: Any  # pipelines' TrainData
  eval_data: Callable  # subset name -> pipelines' EvalData
  num_features: dict  # branch -> D (frozen mode; {} when fine-tuning)
  learning_rate: Callable  # (host state, step, steps per epoch) -> float
  # (first step, n) -> the local batches of steps first .. first + n - 1
  # of `train` stacked [n, b, ...] (read at once, no batches to stack);
  # None: the loop iterates `train` (pipelines.reps.train_stacks).
  train_stacks: Callable | None = None


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def bce(logits, labels):
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


_PROGRAMS = {}


def cached(key, build: Callable[[], Programs]) -> Programs:
  """The one per-process program cache of both modes: every fold (and
  predict) of a config compiles once."""
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def with_learning_rate(opt_state, lr):
  """The injected hyper-parameter set to the host schedule's `lr`."""
  return opt_state._replace(
    hyperparams={**opt_state.hyperparams, "learning_rate": lr}
  )


def step_metrics(loss, grads, params) -> dict:
  """What a step reports: loss and the global L2 norms of the gradients
  (of the trained parameters) and of all parameters."""
  return {
    "loss": loss,
    "grad_norm": optax.global_norm(grads),
    "param_norm": optax.global_norm(params),
  }


def eval_outputs(logits, batch: dict) -> dict:
  """Eval windows -> {'probs' [b, C], 'bce' [b] (window BCE vs its
  trailer's labels), 'trailer' [b] (carried through, see evaluate.py)}."""
  logits = logits.astype(jnp.float32)
  return {
    "probs": jax.nn.sigmoid(logits),
    "bce": optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean(-1),
    "trailer": batch["trailer"],
  }


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


def jit_multi_step(train_step, mesh, shardings: TrainState):
  """Programs.train_steps: `train_step` scanned over K stacked batches
  [K, b, ...] (split over the batch axes on axis 1) and learning rates [K];
  one dispatch and no host round trip per step; the state donated."""

  def steps(state, batches, lrs):
    body = lambda s, x: train_step(s, *x)
    return jax.lax.scan(body, state, (batches, lrs))

  rep = sharding.replicated(mesh)
  return jax.jit(
    steps,
    in_shardings=(shardings, stacked_sharding(mesh), rep),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )


def stacked_sharding(mesh) -> NamedSharding:
  """[K, b, ...] stacks of batches: axis 1 over the batch axes."""
  return NamedSharding(mesh, PartitionSpec(None, sharding.batch_axes(mesh)))


def global_batches(local_batches: list, mesh) -> dict:
  """Per-process numpy batches -> one global stack [K, b, ...] per key
  (what `train_steps` takes; hosts.global_batch for K batches)."""
  stack = {k: np.stack([b[k] for b in local_batches]) for k in local_batches[0]}
  return global_stack(stack, mesh)


def global_stack(local_stack: dict, mesh) -> dict:
  """A per-process stack of batches [K, b, ...] -> global jax.Arrays
  [K, global b, ...] (no copy on CPU)."""
  spec = stacked_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(spec, v)
    for k, v in local_stack.items()
  }

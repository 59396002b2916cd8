"""Frozen mode: the DIViTA head trained on stored clip representations.

Protocol (reference): BCE on logits; AdamW with AMSGrad, reduce-on-plateau
and early stopping on validation loss (optim.py); the best-validation
checkpoint is evaluated on validation and test (loop.py, evaluate.py).

A mode gives the fold loop (loop.py) three things: `fold_setup` (the
compiled programs and the fold's data), `load_variables` (what predict
runs) and whether it reads representations (`READS_REPRESENTATIONS`).
The state's shardings follow big_vision's recipe: eval_shape(init) ->
logical specs -> NamedShardings.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from divita_jax import evaluate, sharding
from divita_jax.models import divita
from divita_jax.pipelines import common, reps
from divita_jax.trainers import checkpoints, param_groups
from divita_jax.trainers import state as st

READS_REPRESENTATIONS = True
TITLE_SUFFIX = ""  # Of the results' summary title.

# ------------------------------------------------------------ model, state


def _dummy_inputs(config, num_features: dict):
  clips = config.train.num_clips
  inputs = {
    b: jnp.zeros((2, clips, num_features[b]), jnp.float32)
    for b in config.model.branches
  }
  return inputs, jnp.ones((2, clips), bool)


def state_shardings(config, model, tx, mesh, num_features: dict):
  """(init fn, abstract state, shardings): eval_shape(init) -> logical
  partition specs -> NamedShardings via the config's axis rules."""

  def init(rng):  # Keeps nn.Partitioned boxes: they carry the logical axes.
    k_params, k_dropout, k_train = jax.random.split(rng, 3)
    variables = model.init(
      {"params": k_params, "dropout": k_dropout},
      *_dummy_inputs(config, num_features),
      train=False,
    )
    return st.TrainState(
      step=jnp.zeros([], jnp.int32),
      params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(variables["params"]),
      rng=k_train,
    )

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  rules = sharding.logical_rules(config.mesh)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  return init, st.with_shardings(abstract, shardings), shardings


# ------------------------------------------------------------- step fns


def train_step(model, tx, state: st.TrainState, batch: dict, lr):
  """One AdamW step; returns the new state and the step's metrics."""
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
    return st.bce(logits, batch["labels"]), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  opt_state = st.with_learning_rate(state.opt_state, lr)
  tx_updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, tx_updates)
  new = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=updates.get("batch_stats", {}),
    opt_state=opt_state,
  )
  return new, st.step_metrics(loss, grads, state.params)


def eval_step(model, variables: dict, batch: dict):
  """Eval windows -> state.eval_outputs."""
  inputs = {b: batch[b] for b in model.branches}
  logits = model.apply(variables, inputs, batch["mask"], train=False)
  return st.eval_outputs(logits, batch)


def programs(config, mesh, num_features: dict) -> st.Programs:
  """The head's Programs for representations of `num_features`."""
  key = (
    "frozen",
    config.model.to_json(),
    config.train.to_json(),
    sharding.logical_rules(config.mesh),
    mesh,
    tuple(sorted(num_features.items())),
  )

  def build():
    model = divita.make_head(config.model)
    tx = param_groups.make_optimizer(config)
    init_boxed, abstract, shardings = state_shardings(
      config, model, tx, mesh, num_features
    )
    init = jax.jit(
      lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings
    )
    step = functools.partial(train_step, model, tx)
    train_fn, eval_fn = st.jit_steps(
      step, functools.partial(eval_step, model), mesh, shardings
    )
    steps_fn = st.jit_multi_step(step, mesh, shardings)
    return st.Programs(
      model, tx, init, abstract, shardings, train_fn, eval_fn, steps_fn
    )

  return st.cached(key, build)


def abstract_variables(config, num_features: dict) -> dict:
  """The variables' abstract tree with shardings (restore target)."""
  mesh = sharding.make_mesh(config.mesh)
  return st.variables_of(programs(config, mesh, num_features).abstract)


# ------------------------------------------------------------ mode interface


def fold_setup(config, mesh, readers: dict, fold, preload: bool):
  """The fold's programs and representation windows (state.FoldSetup).

  `preload` loads the fold's representations into memory first (~7 GB at
  Trailers12k scale; every process holds all, as its share of each global
  batch changes every epoch); `preload=False` reads per batch, only the
  own share (benchmarks/head.py compares them).
  """
  readers = evaluate.branch_readers(config, readers)
  if preload:
    used = np.sort(np.concatenate(list(fold.subsets.values())))
    readers = reps.preload(readers, [fold.ids[i] for i in used])
  num_features = {b: int(r.num_features) for b, r in readers.items()}
  tc = config.train
  batching = common.Batching(tc.num_clips, tc.batch_size)
  epochs = common.Epochs(config.seed, tc.max_epochs)
  train = reps.train_data(readers, fold, batching, epochs)
  eval_batching = common.Batching(tc.num_clips, tc.eval_batch_size)
  eval_data = lambda name: reps.eval_data(readers, fold, name, eval_batching)
  return st.FoldSetup(
    programs=programs(config, mesh, num_features),
    train=train,
    eval_data=eval_data,
    num_features=num_features,
    learning_rate=lambda host, step, steps: host.plateau["lr"],
    # Preloaded: several steps' windows gathered at once (loop.py).
    train_stacks=reps.train_stacks(readers, fold, batching, epochs),
  )


def load_variables(config, fold_dir: str) -> tuple[dict, dict]:
  """(head variables of the best checkpoint, {}: the backbones are the
  config's own)."""
  variables, _ = checkpoints.load_best(
    fold_dir, lambda nf: abstract_variables(config, nf)
  )
  return variables, {}

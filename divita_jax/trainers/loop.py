"""One fold of the protocol, for both training modes.

`train_fold` trains and evaluates one fold in its own folder; the mode
(`config.train.mode`: frozen.py trains the head on stored representations,
finetune.py the backbones and the head on decoded clips) is looked up once
(`mode`) and gives the compiled programs, the fold's data and the learning
rate schedule (state.FoldSetup); everything else is shared: the start point
(resume or init), the epoch loop, validation with reduce-on-plateau and
early stopping (optim.py), checkpoints (checkpoints.py), and the final
evaluation of the best checkpoint (evaluate.py).

A rerun resumes from the latest checkpoint and reproduces an uninterrupted
run exactly; a finished fold is only re-evaluated. A non-finite training
loss stops the run (`NonFiniteLoss`, naming the step) before anything of
that epoch is saved, so the last good checkpoint stays the latest.
"""

import concurrent.futures
import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from divita_jax import evaluate, hosts, sharding
from divita_jax import metrics as metrics_lib
from divita_jax.pipelines import common
from divita_jax.trainers import checkpoints, finetune, frozen, optim
from divita_jax.trainers import state as st

MODES = {"frozen": frozen, "finetune": finetune}
# Training steps per dispatch (a lax.scan over a stack of batches): no
# dispatch, transfer or Python per step; an epoch's last steps that do not
# fill one run one by one (benchmarks/head.py measures the choice).
STEPS_PER_DISPATCH = 8


def mode(config):
  """The module of `config.train.mode` (frozen.py or finetune.py; the
  value is checked with every other one by configs/checks.py)."""
  return MODES[config.train.mode]


class NonFiniteLoss(FloatingPointError):
  """A training step's loss was NaN or infinite."""

  def __init__(self, step: int, loss: float, fold_dir: str):
    super().__init__(
      f"Training loss is {loss} at step {step} ({fold_dir}): stopped; the "
      "latest checkpoint before it is intact. Check the inputs (NaN "
      "features) or lower train.learning_rate / set train.grad_clip_norm."
    )
    self.step = step


@dataclasses.dataclass
class HostState:
  """The host side of a fold's training state, checkpointed with it."""

  epochs_done: int = 0  # Epochs with their validation done.
  done: bool = False  # Training finished (max epochs or early stop).
  plateau: dict = None  # {'best', 'bad', 'lr'}: reduce-on-plateau.
  early_stop: dict = None  # {'best', 'wait'}
  best_epoch: int | None = None
  train_loss_sum: float = 0.0  # Of the current epoch's finished steps.
  iterator: dict | None = None  # The input pipeline's iterator state.
  num_features: dict = None  # branch -> D (frozen mode)

  @classmethod
  def initial(cls, config, num_features: dict) -> "HostState":
    return cls(
      plateau={"best": None, "bad": 0, "lr": config.train.learning_rate},
      early_stop={"best": None, "wait": 0},
      num_features=num_features,
    )

  def to_dict(self) -> dict:  # The checkpoint's JSON, as before this class.
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "HostState":
    return cls(**d)


# ------------------------------------------------------------------- fold


def train_fold(
  config,
  fold_dir: str,
  inputs,
  data,
  preload=True,
  steps_per_dispatch: int = STEPS_PER_DISPATCH,
) -> dict:
  """Trains and evaluates one fold in `fold_dir` (resumes from it).

  `data`: the fold's trailers (pipelines.common.FoldData: ids, labels,
  subsets 'train' / 'validation' / 'test', fold). `inputs`: what the mode
  reads: branch -> representation reader (frozen), or the random-access
  source of the raw trailers (finetune, rows aligned with `data.ids`).
  `preload` (frozen mode): the fold's representations in memory first.
  `steps_per_dispatch`: training steps per call of the scanned program
  (`Programs.train_steps`, where the mode has one); the results do not
  depend on it (the scan is bitwise the same as single steps).

  Returns 'epoch' (best epoch, 1-based), 'val'/'test' (metrics of the best
  checkpoint), 'val_probs'/'test_probs' (per trailer) and 'val_ids'/
  'test_ids'.
  """
  if steps_per_dispatch < 1:
    raise ValueError(
      f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}."
    )
  for name in (n for n, v in data.subsets.items() if not len(v)):
    raise ValueError(f"Fold {data.fold} has an empty {name} subset.")
  mesh = sharding.make_mesh(config.mesh)
  setup = mode(config).fold_setup(config, mesh, inputs, data, preload)
  p = setup.programs
  # Start point: the fold's latest readable checkpoint (resume), else init
  # from config.seed (no pretrained head). First, so that a checkpoint of
  # another config stops the run before anything is written.
  latest, best = checkpoints.managers(fold_dir)
  state, host = checkpoints.restore(latest, "state", p.abstract)
  f = _Fold(
    mesh,
    setup,
    setup.eval_data("validation"),
    data.labels[data.subsets["validation"]],
    latest,
    best,
    fold_dir,
    # TensorBoard only: the console gets one line per epoch (_end_epoch).
    metric_writers.SummaryWriter(fold_dir)
    if jax.process_index() == 0
    else metric_writers.MultiWriter([]),
    steps_per_dispatch,
  )
  if state is None:
    state = p.init(jax.random.PRNGKey(config.seed))
    host = HostState.initial(config, setup.num_features)
    parameter_overview.log_parameter_overview(
      state.params,
      include_stats=jax.process_count() == 1,
      msg=f"Fold {data.fold} parameters",
    )
  else:
    host = HostState.from_dict(host)
    logging.info(
      "Fold %d: resuming at step %d (%d epochs done).",
      data.fold,
      int(state.step),
      host.epochs_done,
    )
  if not host.done:
    state, host = _run_epochs(config, f, state, host)
  del state
  return _evaluate_best(config, f, data)


def _evaluate_best(config, f: "_Fold", data) -> dict:
  """Metrics and probabilities of the best checkpoint, val and test."""
  p = f.setup.programs
  variables, best = checkpoints.restore(
    f.best, "variables", st.variables_of(p.abstract)
  )
  if variables is None:
    raise ValueError(f"No readable best checkpoint under {f.fold_dir}/best.")
  out = {"epoch": best["epoch"]}
  subsets = (("validation", "val", f.val), ("test", "test", None))
  for name, key, windows in subsets:
    windows = windows or f.setup.eval_data(name)
    outputs = evaluate.window_outputs(
      p.eval_step, variables, windows, f.mesh, config.model.branches
    )
    rows = data.subsets[name]
    probs = evaluate.trailer_probs(outputs, len(rows))
    out[key] = metrics_lib.compute_metrics(probs, data.labels[rows])
    out[f"{key}_probs"] = probs
    out[f"{key}_ids"] = [data.ids[i] for i in rows]
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
  setup: st.FoldSetup
  val: object  # The validation windows (pipelines' EvalData).
  val_labels: np.ndarray  # [validation trailers, classes]
  latest: ocp.CheckpointManager
  best: ocp.CheckpointManager
  fold_dir: str
  writer: metric_writers.MetricWriter
  steps_per_dispatch: int = 1

  @property
  def train_step(self) -> Callable:
    return self.setup.programs.train_step

  @property
  def steps(self) -> int:
    return self.setup.train.steps_per_epoch


def _end_epoch(config, f: _Fold, state, host: HostState, epoch, step):
  """Validation, plateau and early-stopping updates, best checkpoint."""
  tc = config.train
  outputs = evaluate.window_outputs(
    f.setup.programs.eval_step,
    st.variables_of(state),
    f.val,
    f.mesh,
    config.model.branches,
  )
  probs = evaluate.trailer_probs(outputs, len(f.val_labels))
  val_loss = evaluate.validation_loss(config, outputs, probs, f.val_labels)
  es = optim.early_stop_update(host.early_stop, val_loss)
  improved = es.pop("improved")
  scalars = {
    "epoch": epoch + 1,
    "val_loss": val_loss,
    "train_loss": host.train_loss_sum / f.steps,
    "learning_rate": f.setup.learning_rate(host, step - 1, f.steps),
  }
  host = dataclasses.replace(
    host,
    epochs_done=epoch + 1,
    early_stop=es,
    plateau=optim.plateau_update(host.plateau, val_loss, tc),
    train_loss_sum=0.0,
  )
  if improved:
    host.best_epoch = epoch + 1
    checkpoints.save(
      f.best,
      epoch + 1,
      "variables",
      st.variables_of(state),
      dict(epoch=epoch + 1, val_loss=val_loss, num_features=host.num_features),
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


def _epoch_losses(f: _Fold, host: HostState, losses: list, first: int):
  """The epoch's loss sum so far (`losses`: one [n] array per dispatch,
  summed in step order, so that a resumed epoch sums to the same float); a
  non-finite loss stops the run, naming its step."""
  values = [float(x) for x in np.concatenate([np.asarray(x) for x in losses])]
  for i, v in enumerate(values):
    if not np.isfinite(v):
      raise NonFiniteLoss(first + i + 1, v, f.fold_dir)
  return sum(values, host.train_loss_sum)


def _log_step(f: _Fold, step: int, metrics: dict):
  """The step's loss and global gradient / parameter L2 norms: TensorBoard
  and one console line (every `train.log_every_steps` steps)."""
  scalars = {
    "train_loss_step": float(metrics["loss"]),
    "grad_norm": float(metrics["grad_norm"]),
    "param_norm": float(metrics["param_norm"]),
  }
  f.writer.write_scalars(step, scalars)
  logging.info(
    "Step %d: train loss %.5f, grad norm %.4g, param norm %.4g",
    step,
    *scalars.values(),
  )


def _run_epochs(config, f: _Fold, state, host: HostState):
  """Trains from the state's step until early stopping or max epochs."""
  tc = config.train
  steps = f.steps
  step = int(state.step)
  progress = periodic_actions.ReportProgress(
    num_train_steps=steps * tc.max_epochs,
    writer=f.writer,
    every_steps=tc.log_every_steps,
    every_secs=None,
  )
  with checkpoints.Preemption(f.latest) as preemption:
    it = train_batches(f.setup, host.iterator)
    preempted = False
    for epoch in range(host.epochs_done, tc.max_epochs):
      losses, first = [], step
      while step < (epoch + 1) * steps:
        n = _dispatch_size(f, (epoch + 1) * steps - step)
        state, metrics = _train_steps(f, state, it, host, step, n)
        losses.append(metrics["loss"])
        for s in range(step + 1, step + n + 1):
          progress(s)
          if s % tc.log_every_steps == 0:
            _log_step(f, s, jax.tree.map(lambda x: x[s - step - 1], metrics))
        step += n
        preempted = preemption.at(step)
        if preempted and step < (epoch + 1) * steps:
          host = dataclasses.replace(
            host,
            iterator=it.get_state(),
            train_loss_sum=_epoch_losses(f, host, losses, first),
          )
          checkpoints.save(f.latest, step, "state", state, host.to_dict())
          f.writer.flush()
          raise checkpoints.Preempted(step, preemption.signum)
      host = dataclasses.replace(
        host,
        train_loss_sum=_epoch_losses(f, host, losses, first),
        iterator=it.get_state(),
      )
      host, stop = _end_epoch(config, f, state, host, epoch, step)
      host.done = stop
      preempted = preempted or preemption.received
      if stop or preempted or (epoch + 1) % tc.checkpoint_every_epochs == 0:
        checkpoints.save(f.latest, step, "state", state, host.to_dict())
      if preempted and not stop:
        f.writer.flush()
        raise checkpoints.Preempted(step, preemption.signum)
      if stop:
        break
  return state, host


def _dispatch_size(f: _Fold, left: int) -> int:
  """Steps of the next dispatch: `steps_per_dispatch` through the scanned
  program while the epoch has that many left, then single steps (two
  compiled programs at most)."""
  k = f.steps_per_dispatch
  return k if f.setup.programs.train_steps and 1 < k <= left else 1


def _train_steps(f: _Fold, state, it, host: HostState, step: int, n: int):
  """`n` steps from `step` in one dispatch; metrics stacked [n] (no host
  round trip: the losses are read at the epoch's end)."""
  lrs = [f.setup.learning_rate(host, s, f.steps) for s in range(step, step + n)]
  lrs = np.asarray(lrs, np.float32)
  then = _dispatch_size(f, f.steps - (step + n) % f.steps)
  local = next_batches(it, n, then)
  if n == 1:
    batch = hosts.global_batch(local, f.mesh)
    state, metrics = f.train_step(state, batch, lrs[0])
    return state, jax.tree.map(lambda x: x[None], metrics)
  batches = st.global_stack(local, f.mesh)
  return f.setup.programs.train_steps(state, batches, lrs)


# ------------------------------------------------------------ batches


class Stacks:
  """Training batches from `FoldSetup.train_stacks`, several steps per
  read, the next dispatch's read ahead on a thread (beside the running
  step); the state is the pipeline iterator's ({'next_index': steps
  consumed}), so either restores the other's checkpoint."""

  def __init__(self, read: Callable, state: dict | None = None):
    self._read = read
    self._next = int(state["next_index"]) if state else 0
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._ahead = None  # ((first step, n), Future)

  def take(self, n: int, then: int = 0) -> dict:
    """The next `n` steps' local batches stacked [n, b, ...]; `then` > 0:
    read the following `then` steps ahead."""
    key, ahead = (self._next, n), self._ahead
    out = ahead[1].result() if ahead and ahead[0] == key else self._read(*key)
    self._next += n
    self._ahead = None
    if then:  # Past the data's end the read fails unseen: never taken.
      nxt = (self._next, then)
      self._ahead = (nxt, self._pool.submit(self._read, *nxt))
    return out

  def get_state(self) -> dict:
    return {"next_index": self._next}


def train_batches(setup: st.FoldSetup, state: dict | None = None):
  """The training iterator the loop reads (from iterator `state`):
  `Stacks` where the mode has `train_stacks` (preloaded representations),
  else the pipeline's (common.iterate)."""
  if setup.train_stacks is not None:
    return Stacks(setup.train_stacks, state)
  return common.iterate(setup.train, state=state)


def next_batches(it, n: int, then: int = 0) -> dict:
  """The next `n` steps' local batches of a `train_batches` iterator: the
  batch itself when n == 1, else stacked [n, b, ...]; `then`: the size of
  the dispatch after these (read ahead by `Stacks`; 0: none)."""
  if isinstance(it, Stacks):
    out = it.take(n, then)
    return {k: v[0] for k, v in out.items()} if n == 1 else out
  if n == 1:
    return next(it)
  batches = [next(it) for _ in range(n)]
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

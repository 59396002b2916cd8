"""End-to-end fine-tuning: the backbones and the DIViTA head in one step.

`config.train.mode = "finetune"` runs the fold loop of loop.py (the same
checkpoints, resume and evaluation as frozen.py) on decoded clips instead of
stored representations: a training example is a window of
`finetune.clips_per_trailer` clips of one trailer (clips.py), run
through the backbone(s) and the head, with the frozen mode's loss;
evaluation runs every window of `train.num_clips` clips through the
fine-tuned backbones and averages per trailer as in frozen mode.

- Start: converted checkpoints or random init, loaded as extraction loads
  them (runtime.make_backbone). Backbone BatchNorm keeps its statistics
  (eval mode); the head starts from config.seed.
- The audio branch: each clip's log-mel (clips.py, as extraction computes
  it) through the audio encoder (`backbones.audio.pooling='window'` only),
  trained like the other backbones (params "audio/...", layer 0 = patch
  embedding / stem convolutions, then one per block); frozen whole by
  `finetune.freeze=("^audio/",)` (anchored: "audio/" would also freeze
  the head's audio branch, "head/audio/...").
- What trains: all but `finetune.freeze` (regexes searched in
  "<branch>/<param path>", e.g. "video/Transformer/encoderblock_0/") and
  the first `finetune.freeze_layers` layers of each backbone (param_groups:
  0 = stem / patch embedding, then one per block). Frozen parameters get
  no gradient and no optimizer state, and stay bit for bit.
- Learning rates: `train.learning_rate` for the head, times
  `finetune.backbone_lr_scale` for the backbones, times
  `finetune.layer_decay ** (L + 1 - layer)` (layer-wise decay); the
  schedule (`finetune.schedule`) is the frozen protocol's plateau or
  warmup + cosine (optim.step_lr).
- Memory: parameters and optimizer state sharded over the `fsdp` mesh axis
  (sharding.with_fsdp) and over `model` by the logical rules; the batch
  over data x fsdp; `finetune.remat` per block; `finetune.dtype` bfloat16
  computes in bf16 with float32 master weights; `finetune.microbatches`
  splits the batch and accumulates gradients in a scan, in one program.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from divita_jax import extract, sharding, video
from divita_jax.models import backbone, divita, runtime
from divita_jax.pipelines import clips, common
from divita_jax.trainers import checkpoints, optim
from divita_jax.trainers import param_groups as groups
from divita_jax.trainers import state as st

READS_REPRESENTATIONS = False  # Decodes the trailers' clips itself.
TITLE_SUFFIX = (
  ", backbones fine-tuned end to end"  # Of the results' summary title.
)
# ------------------------------------------------------------------ model


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """Backbones (branch -> module) and the DIViTA head, as one function of
  params {'head', branch...} and batch_stats of the same names."""

  head: nn.Module
  backbones: dict  # branch -> backbone module (remat, compute dtype set)
  per_frame: dict  # branch -> 2-D backbone: frames alone, mean over T
  frames: dict  # branch -> runtime.clip_frames indices (or None)
  stats: dict  # branch -> (mean, std) of the input convention; None: audio
  specs: dict  # branch -> backbone spec
  frozen: frozenset  # parameter names without gradients
  microbatches: int
  eval_microbatches: int
  mesh: jax.sharding.Mesh

  @property
  def branches(self) -> tuple:
    return tuple(self.head.branches)

  def features(self, params, batch_stats, batch) -> dict:
    """uint8 clips {branch: [B, n, T, H, W, 3]} (audio: float32 log-mels
    [B, n, frames, bins]) -> {branch: [B, n, D]}."""
    out = {}
    for b in self.branches:
      x = batch[b]
      if self.frames[b] is not None:  # The clip model's own frame count.
        x = x[:, :, self.frames[b]]
      lead = x.shape[:3] if self.per_frame[b] else x.shape[:2]
      x = x.reshape(-1, *x.shape[len(lead) :])
      if self.stats[b] is not None:  # Log-mels come normalised.
        x = runtime.normalize(x, *self.stats[b])
      variables = {"params": params[b]}
      if batch_stats.get(b):
        variables["batch_stats"] = batch_stats[b]
      pooled, _ = self.backbones[b].apply(variables, x)
      pooled = pooled.astype(jnp.float32).reshape(*lead, -1)
      out[b] = pooled.mean(2) if self.per_frame[b] else pooled
    return out

  def logits(self, params, batch_stats, batch, train: bool, rng=None):
    """(logits [B, C], head batch_stats after the step)."""
    feats = self.features(params, batch_stats, batch)
    variables = {"params": params["head"], "batch_stats": batch_stats["head"]}
    if not train:
      return self.head.apply(variables, feats, batch["mask"], train=False), {}
    logits, updates = self.head.apply(
      variables,
      feats,
      batch["mask"],
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    return logits, updates["batch_stats"]

  def micro(self, tree, k: int):
    """[B, ...] -> [k, B / k, ...]; micro-batch j = rows j, j + k, ...: each
    device's rows split evenly, so no row moves between devices."""
    axes = sharding.batch_axes(self.mesh)
    spec = NamedSharding(self.mesh, PartitionSpec(None, axes))

    def split(x):
      x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, tree)


def _unmicro(x):
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def loss_and_grads(m: Model, state: st.TrainState, batch: dict):
  """(loss, gradients of the trainable params, head batch_stats) of a
  batch, accumulated over `m.microbatches` micro-batches in a scan: the
  batch's weighted-mean BCE (a failed trailer weighs 0)."""
  rng = jax.random.fold_in(state.rng, state.step)
  part = groups.trainable(state.params, m.frozen)
  total = jnp.maximum(batch["weight"].sum(), 1.0)  # Examples in the batch.

  def loss_fn(part, batch_stats, mb, rng):
    params = groups.merge(state.params, part)
    logits, head_stats = m.logits(params, batch_stats, mb, True, rng)
    bce = optax.sigmoid_binary_cross_entropy(logits, mb["labels"]).mean(-1)
    return jnp.sum(bce * mb["weight"]) / total, head_stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if m.microbatches == 1:  # No loop: XLA:CPU runs conv gradients in a
    # scan body 3.5x slower (benchmarks/finetune.py).
    rng_0 = jax.random.fold_in(rng, 0)
    (loss, head_stats), grads = grad_fn(part, state.batch_stats, batch, rng_0)
    return loss, grads, head_stats

  def accumulate(carry, xs):
    grads, loss, head_stats = carry
    mb, i = xs
    stats = {**state.batch_stats, "head": head_stats}
    (loss_i, head_stats), grads_i = grad_fn(
      part, stats, mb, jax.random.fold_in(rng, i)
    )
    grads = jax.tree.map(jnp.add, grads, grads_i)
    return (grads, loss + loss_i, head_stats), None

  carry = (
    jax.tree.map(jnp.zeros_like, part),
    jnp.zeros([], jnp.float32),
    state.batch_stats["head"],
  )
  xs = (m.micro(batch, m.microbatches), jnp.arange(m.microbatches))
  (grads, loss, head_stats), _ = jax.lax.scan(accumulate, carry, xs)
  return loss, grads, head_stats


def train_step(m: Model, tx, state: st.TrainState, batch: dict, lr):
  """One AdamW step; frozen parameters are carried over untouched."""
  loss, grads, head_stats = loss_and_grads(m, state, batch)
  part = groups.trainable(state.params, m.frozen)
  opt_state = st.with_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, part)
  new = state.replace(
    step=state.step + 1,
    params=groups.merge(state.params, optax.apply_updates(part, updates)),
    batch_stats={**state.batch_stats, "head": head_stats},
    opt_state=opt_state,
  )
  return new, st.step_metrics(loss, grads, state.params)


def eval_step(m: Model, variables: dict, batch: dict):
  """Eval windows -> state.eval_outputs, in
  `finetune.eval_microbatches` micro-batches (one at a time through the
  backbones: a window holds train.num_clips clips)."""
  inputs = {k: batch[k] for k in (*m.branches, "mask")}

  def one(mb):
    logits, _ = m.logits(
      variables["params"], variables["batch_stats"], mb, False
    )
    return logits.astype(jnp.float32)

  k = m.eval_microbatches
  if k == 1:
    logits = one(inputs)
  else:
    logits = _unmicro(jax.lax.map(one, m.micro(inputs, k)))
  return st.eval_outputs(logits, batch)


# ---------------------------------------------------------------- programs


def _backbones(config) -> dict:
  """branch -> (module with remat and compute dtype, variables, spec)."""
  if "audio" in config.model.branches:
    pooling = config.backbones.audio.pooling
    if pooling != "window":
      raise ValueError(
        f"backbones.audio.pooling={pooling!r} is not built for "
        "train.mode='finetune'; use 'window'."
      )
  out = {}
  for b in config.model.branches:
    module, variables, spec = runtime.make_backbone(config, b)
    module = module.clone(
      remat=config.finetune.remat,
      dtype=jnp.dtype(runtime.compute_dtype(config.finetune.dtype)),
    )
    out[b] = (module, runtime.as_variables(variables), spec)
  return out


def _boxed(params, axes):
  """Params with their logical axis names (nn.Partitioned) where known."""

  def box(x, names):
    names = tuple(names) if names is not None else ()
    if len(names) == np.ndim(x) and any(n is not None for n in names):
      return nn.Partitioned(x, names)
    return x

  return jax.tree.map(box, params, axes)


def _init_fn(config, head, loaded: dict):
  """(init(rng, backbone variables) -> boxed st.TrainState, frozen names,
  optimizer): the parameter groups come from the params' names."""
  axes = {b: backbone.logical_axes(m, s) for b, (m, _, s) in loaded.items()}
  dims = {b: int(s["feature_dim"]) for b, (_, _, s) in loaded.items()}
  n = config.finetune.clips_per_trailer
  dummy = {b: jnp.zeros((2, n, d), jnp.float32) for b, d in dims.items()}

  def head_init(rng):
    k_params, k_dropout = jax.random.split(rng)
    return head.init(
      {"params": k_params, "dropout": k_dropout},
      dummy,
      jnp.ones((2, n), bool),
      train=False,
    )

  head_shapes = jax.eval_shape(head_init, jax.random.PRNGKey(0))
  names = {"head": nn.meta.unbox(head_shapes["params"])}
  names.update({b: v["params"] for b, (_, v, _) in loaded.items()})
  frozen, scales, decay = groups.param_groups(config, names)
  tx = groups.make_optimizer(config, scales, decay)

  def init(rng, variables):
    k_head, k_train = jax.random.split(rng)
    head_vars = head_init(k_head)
    params = {"head": head_vars["params"]}
    stats = {"head": head_vars.get("batch_stats", {})}
    for b in axes:
      params[b] = _boxed(variables[b]["params"], axes[b])
      stats[b] = variables[b].get("batch_stats", {})
    return st.TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=stats,
      opt_state=tx.init(groups.trainable(params, frozen)),
      rng=k_train,
    )

  return init, frozen, tx


def programs(config, mesh) -> st.Programs:
  """The fine-tuning Programs of `config` on `mesh` (cached per process):
  init loads the backbones' starting weights."""
  return st.cached(
    ("finetune", config.to_json(), mesh), lambda: _build(config, mesh)
  )


def _build(config, mesh) -> st.Programs:
  loaded = _backbones(config)
  head = divita.make_head(config.model, config.finetune.head_batch_norm)
  init_boxed, frozen, tx = _init_fn(config, head, loaded)
  # Host arrays: every process passes the same values (multi-host jit);
  # no device keeps a whole copy.
  start = jax.device_get({b: v for b, (_, v, _) in loaded.items()})
  loaded = {b: (m, None, spec) for b, (m, _, spec) in loaded.items()}
  abstract = jax.eval_shape(init_boxed, jax.random.PRNGKey(0), start)
  shardings = sharding.tree_shardings(
    abstract, mesh, sharding.logical_rules(config.mesh)
  )
  abstract = st.with_shardings(abstract, shardings)
  init_jit = jax.jit(
    lambda r, v: nn.meta.unbox(init_boxed(r, v)), out_shardings=shardings
  )
  model = Model(
    head=head,
    backbones={b: m for b, (m, _, _) in loaded.items()},
    per_frame={
      b: backbone.is_image_model(s) for b, (_, _, s) in loaded.items()
    },
    frames={
      b: runtime.clip_frames(s, config.clips.frames_per_clip)
      for b, (_, _, s) in loaded.items()
    },
    stats={
      b: None
      if backbone.is_audio_model(s)
      else backbone.input_stats(s, config.backbones[b].normalization or None)
      for b, (_, _, s) in loaded.items()
    },
    specs={b: s for b, (_, _, s) in loaded.items()},
    frozen=frozenset(frozen),
    microbatches=config.finetune.microbatches,
    eval_microbatches=config.finetune.eval_microbatches,
    mesh=mesh,
  )
  train_fn, eval_fn = st.jit_steps(
    functools.partial(train_step, model, tx),
    functools.partial(eval_step, model),
    mesh,
    shardings,
  )
  return st.Programs(
    model,
    tx,
    lambda rng: init_jit(rng, start),
    abstract,
    shardings,
    train_fn,
    eval_fn,
  )


# -------------------------------------------------------------------- data


def _branch_inputs(config) -> dict:
  """The frame branches' Decoder.branches entries."""
  out = {}
  for b in (b for b in config.model.branches if b != "audio"):
    kind = config.backbones[b].kind
    image = backbone.is_image_model(
      {"kind": kind, "model": {"dims": 3 if kind == "shufflenet3d" else 2}}
    )
    out[b] = {
      "resolution": config.backbones[b].resolution,
      "center_frame": image and config.backbones[b].frame_pooling == "center",
    }
  return out


def fold_setup(config, mesh, source, fold, preload: bool = True):
  """The fold's programs and decoded-clip windows (state.FoldSetup);
  `source`: the random-access TFDS source of the trailers (rows aligned
  with `fold.ids`). Clips are decoded per batch (`preload` is unused)."""
  del preload
  f, tc = config.finetune, config.train
  clip_kwargs = video.sample_kwargs(config.clips, 0)
  del clip_kwargs["resolution"]
  p = programs(config, mesh)
  sound = None
  if "audio" in config.model.branches:
    spec = p.model.specs["audio"]
    sound = {"spec": spec, "seconds": float(config.clips.audio_seconds)}
  decoder = clips.Decoder(
    source,
    _branch_inputs(config),
    clip_kwargs,
    threads=f.decode_threads,
    augment=f.augment.to_dict(),
    audio=sound,
  )
  train = clips.train_data(
    decoder,
    fold,
    common.Batching(f.clips_per_trailer, tc.batch_size),
    common.Epochs(config.seed, tc.max_epochs),
    num_workers=extract.auto_processes(f.decode_processes),
  )
  eval_batching = common.Batching(tc.num_clips, tc.eval_batch_size)
  eval_data = lambda name: clips.eval_data(decoder, fold, name, eval_batching)

  return st.FoldSetup(
    programs=p,
    train=train,
    eval_data=eval_data,
    num_features={},
    learning_rate=functools.partial(learning_rate, config),
  )


def learning_rate(config, host, step: int, steps_per_epoch: int) -> float:
  """`finetune.schedule`: the plateau's rate, or warmup + cosine."""
  if config.finetune.schedule == "plateau":
    return host.plateau["lr"]
  return optim.warmup_cosine(
    config.train.learning_rate,
    round(config.finetune.warmup_epochs * steps_per_epoch),
    steps_per_epoch * config.train.max_epochs,
    step,
  )


def load_variables(config, fold_dir: str) -> tuple[dict, dict]:
  """(head variables, branch -> backbone variables) of the best
  checkpoint of a fine-tuned fold."""
  p = programs(config, sharding.make_mesh(config.mesh))
  variables, _ = checkpoints.load_best(
    fold_dir, lambda _: st.variables_of(p.abstract)
  )
  variables = jax.device_get(variables)
  params, stats = variables["params"], variables["batch_stats"]
  head = {"params": params["head"], "batch_stats": stats["head"]}
  tuned = {}
  for b in config.model.branches:
    tuned[b] = {"params": params[b]}
    if stats.get(b):
      tuned[b]["batch_stats"] = stats[b]
  return head, tuned

"""DIViTA head: BatchNorm, clip aggregation module (CAM), classifier, fusion.

Numerics follow the public PyTorch code (see divita_reference.md): BatchNorm
with PyTorch's statistics (eps 1e-5, momentum 0.1, unbiased running
variance), LayerNorm eps 1e-5, bias-free head-major attention, GRU gates in
PyTorch order (reset, update, new), PyTorch's default initialisation.

Padding. Every input carries a clip mask (True = real clip). With
`mask_padding=True` padded clips change nothing: they are excluded from the
BatchNorm statistics, attention keys, GRU state, conv outputs and every mean
over clips. With `mask_padding=False` padded clips are set to zero and then
processed as ordinary clips, exactly as the reference processes its
zero-padded evaluation windows. The `conv` CAM assumes padding at the end of
the window (real clips first), which is what the input pipeline produces.

Logical axis names of the parameters (for `nn.logical_to_mesh_axes`):
`embed` input representation features, `hidden` CAM width (transformer
width, GRU state, conv input channels after the first layer), `mlp`
transformer feed-forward hidden, `heads` attention heads x head dim
(head-major), `classes` logits, `gates` fused GRU gates (3 x hidden),
`channels` conv output channels. Names without a rule are replicated; a
mesh axis must divide the dimensions mapped to it (the default tsfm's 128
and 768 divide by 2, 4 and 8).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from divita_jax.models.axes import logical
from divita_jax.models.cams import ConvCAM, GruCAM, TsfmCAM, dense, masked_mean
from tfds_trailers12k.genres import NUM_GENRES

_CAM_FORMS = {
  "tsfm": "tsfm or tsfm_<hidden>_<heads>_<ffmult>_<dropout>",
  "savg": "savg",
  "gru": "gru or gru_<layers>_<hidden>",
  "conv": "conv or conv_<kernel>_<filters>[_<kernel>_<filters>...]",
}


def parse_cam(cam: str) -> tuple[str, dict]:
  """Decodes a CAM variant string of the reference into (kind, kwargs).

  `tsfm` -> ("tsfm", {hidden: 128, heads: 4, ff_mult: 6, dropout: 0.25});
  `savg` -> ("savg", {}); `gru` -> ("gru", {layers: 1, hidden: 115});
  `conv` -> ("conv", {layers: ((3, 128),)}); explicit variants override.
  """
  if not isinstance(cam, str):
    raise ValueError(f"CAM must be a string, got {cam!r}.")
  kind, *parts = cam.split("_")
  if kind not in _CAM_FORMS:
    raise ValueError(
      f"Unknown CAM {cam!r}: expected one of {' | '.join(_CAM_FORMS.values())}."
    )
  bad = ValueError(f"Invalid CAM {cam!r}: expected {_CAM_FORMS[kind]}.")
  try:
    if kind == "tsfm":
      if not parts:
        parts = ["128", "4", "6", "0.25"]
      if len(parts) != 4:
        raise bad
      hidden, heads, ff_mult = (int(p) for p in parts[:3])
      kwargs = dict(
        hidden=hidden, heads=heads, ff_mult=ff_mult, dropout=float(parts[3])
      )
      if min(hidden, heads, ff_mult) < 1 or not 0 <= kwargs["dropout"] < 1:
        raise bad
      if hidden % heads:
        raise ValueError(
          f"Invalid CAM {cam!r}: hidden {hidden} is not divisible by "
          f"heads {heads}."
        )
    elif kind == "savg":
      if parts:
        raise bad
      kwargs = {}
    elif kind == "gru":
      parts = parts or ["1", "115"]
      if len(parts) != 2:
        raise bad
      kwargs = dict(layers=int(parts[0]), hidden=int(parts[1]))
      if min(kwargs.values()) < 1:
        raise bad
    else:  # conv
      values = [int(p) for p in parts] if parts else [3, 128]
      if len(values) % 2 or min(values) < 1:
        raise bad
      kwargs = dict(layers=tuple(zip(values[::2], values[1::2])))
  except ValueError as e:  # int()/float() failures get the friendly message.
    raise (e if str(e).startswith("Invalid CAM") else bad) from None
  return kind, kwargs


# ---------------------------------------------------------------------------
# Modules.


class BatchNorm(nn.Module):
  """BatchNorm over the last axis of [B, S, F] with PyTorch's statistics.

  Batch statistics over batch and clips (real clips only when a mask is
  given); biased variance to normalise, unbiased for the running update
  `new = (1 - momentum) old + momentum batch`.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  # False: the running statistics in training too (no batch dependence).
  use_batch_stats: bool = True

  @nn.compact
  def __call__(self, x, mask, train: bool):
    f = x.shape[-1]
    ones = logical(nn.initializers.ones, "embed")
    zeros = logical(nn.initializers.zeros, "embed")
    scale = self.param("scale", ones, (f,), jnp.float32)
    bias = self.param("bias", zeros, (f,), jnp.float32)
    stat = lambda init: logical(lambda: init(None, (f,)), "embed")
    ra_mean = self.variable("batch_stats", "mean", stat(nn.initializers.zeros))
    ra_var = self.variable("batch_stats", "var", stat(nn.initializers.ones))
    x = x.astype(jnp.float32)
    if not train or not self.use_batch_stats:
      mean, var = ra_mean.value, ra_var.value
    else:
      if mask is None:
        w = jnp.ones(x.shape[:2] + (1,), jnp.float32)
      else:
        w = mask[..., None].astype(jnp.float32)
      n = w.sum()  # Real clips in the batch.
      mean = (x * w).sum((0, 1)) / jnp.maximum(n, 1)
      var = jnp.square((x - mean) * w).sum((0, 1)) / jnp.maximum(n, 1)
      if not self.is_initializing():
        m = self.momentum
        unbiased = var * n / jnp.maximum(n - 1, 1)
        # An all-padding batch carries no statistics: keep the old ones.
        keep = n == 0
        ra_mean.value = jnp.where(
          keep, ra_mean.value, (1 - m) * ra_mean.value + m * mean
        )
        ra_var.value = jnp.where(
          keep, ra_var.value, (1 - m) * ra_var.value + m * unbiased
        )
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class Branch(nn.Module):
  """BatchNorm -> CAM -> Linear(hidden -> classes) on [B, S, F]."""

  cam: str
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  batch_norm: str = "batch"

  @nn.compact
  def __call__(self, x, mask, train: bool):
    x = BatchNorm(
      dtype=self.dtype,
      use_batch_stats=self.batch_norm == "batch",
      name="bn",
    )(x, mask, train)
    if mask is not None:
      x = x * mask[..., None].astype(x.dtype)  # Padding stays exactly zero.
    kind, kw = parse_cam(self.cam)
    if kind == "tsfm":
      x = TsfmCAM(**kw, dtype=self.dtype, name="cam")(x, mask, train)
    elif kind == "gru":
      x = GruCAM(**kw, dtype=self.dtype, name="cam")(x, mask, train)
    elif kind == "conv":
      x = ConvCAM(**kw, dtype=self.dtype, name="cam")(x, mask, train)
    else:  # savg
      x = nn.relu(masked_mean(x, mask))
    # x: [B, hidden]
    names = ("embed" if kind == "savg" else "hidden", "classes")
    h = x.shape[-1]
    return dense(self.num_classes, h, names, self.dtype, "head")(x)


class DIViTA(nn.Module):
  """DIViTA head over per-clip representations of one or two backbones.

  `__call__(inputs, mask, train)`: `inputs[branch]` is [B, clips, features]
  for each name in `branches`, `mask` bool [B, clips] (True = real clip).
  Returns float32 logits [B, num_classes]. Late fusion averages the logits
  of one Branch per backbone (submodules named after the branches); early
  fusion concatenates features into one Branch named "_".join(branches).
  BatchNorm statistics live in `batch_stats` (mutable when `train`);
  dropout uses the `dropout` rng. `batch_norm`: "batch" (the reference:
  batch statistics in training) | "running" (the stored statistics in
  training too, never updated: an affine layer whose outputs do not depend
  on the batch, e.g. to accumulate gradients over micro-batches exactly).
  """

  branches: tuple[str, ...] = ("image", "video")
  fusion: str = "late"  # late | early
  cam: str = "tsfm_128_4_6_0.25"
  mask_padding: bool = True
  num_classes: int = NUM_GENRES
  dtype: jnp.dtype = jnp.float32
  batch_norm: str = "batch"

  def _check(self, inputs, mask):
    if self.fusion not in ("late", "early"):
      raise ValueError(f"Unknown fusion {self.fusion!r}: expected late|early.")
    if self.batch_norm not in ("batch", "running"):
      raise ValueError(
        f"Unknown batch_norm {self.batch_norm!r}: expected batch|running."
      )
    if not self.branches:
      raise ValueError("DIViTA needs at least one branch.")
    missing = [b for b in self.branches if b not in inputs]
    if missing:
      raise ValueError(
        f"DIViTA inputs lack branch(es) {missing}; got {sorted(inputs)}."
      )
    for b in self.branches:
      if inputs[b].ndim != 3 or inputs[b].shape[:2] != mask.shape:
        raise ValueError(
          f"Branch {b!r}: expected [batch, clips, features] matching mask "
          f"{tuple(mask.shape)}, got {tuple(inputs[b].shape)}."
        )

  @nn.compact
  def __call__(self, inputs: dict, mask: jax.Array, train: bool):
    self._check(inputs, mask)
    parse_cam(self.cam)  # Fail early on a bad string.
    mask = mask.astype(bool)
    # Unmasked mode: padding is zero features processed like real clips.
    xs = {
      b: jnp.where(mask[..., None], inputs[b], 0).astype(self.dtype)
      for b in self.branches
    }
    m = mask if self.mask_padding else None
    branch = functools.partial(
      Branch, self.cam, self.num_classes, self.dtype, self.batch_norm
    )
    if self.fusion == "early":
      x = jnp.concatenate([xs[b] for b in self.branches], -1)  # [B, S, sum F]
      return branch(name="_".join(self.branches))(x, m, train).astype(
        jnp.float32
      )
    logits = [branch(name=b)(xs[b], m, train) for b in self.branches]
    return jnp.mean(jnp.stack(logits), axis=0).astype(jnp.float32)


def make_head(model_config, batch_norm: str = "batch") -> DIViTA:
  """The DIViTA head of `config.model` (both training modes use this)."""
  m = model_config
  return DIViTA(
    branches=tuple(m.branches),
    fusion=m.fusion,
    cam=m.cam,
    mask_padding=m.mask_padding,
    num_classes=m.num_classes,
    dtype=jnp.float32,
    batch_norm=batch_norm,
  )

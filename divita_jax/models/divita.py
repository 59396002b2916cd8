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
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
# Initialisers: PyTorch defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _torch_kernel(names):
  # variance_scaling(1/3, fan_in, uniform) == kaiming_uniform(a=sqrt(5)).
  return _partitioned(
    nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), names
  )


def _uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _torch_bias(fan_in, names):
  return _partitioned(_uniform(1 / math.sqrt(fan_in)), names)


def _dense(features, fan_in, names, dtype, name, use_bias=True):
  """PyTorch-style nn.Linear with logical axis names (in, out)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=_torch_kernel(names),
    bias_init=_torch_bias(fan_in, names[1:]),
    name=name,
  )


def _masked_mean(x, mask):
  """Mean over clips ([B, S, C] -> [B, C]); mask None = all clips real."""
  if mask is None:
    return x.mean(axis=1)
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)


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

  @nn.compact
  def __call__(self, x, mask, train: bool):
    f = x.shape[-1]
    ones = _partitioned(nn.initializers.ones, ("embed",))
    zeros = _partitioned(nn.initializers.zeros, ("embed",))
    scale = self.param("scale", ones, (f,), jnp.float32)
    bias = self.param("bias", zeros, (f,), jnp.float32)
    stat = lambda init: _partitioned(lambda: init(None, (f,)), ("embed",))
    ra_mean = self.variable("batch_stats", "mean", stat(nn.initializers.zeros))
    ra_var = self.variable("batch_stats", "var", stat(nn.initializers.ones))
    x = x.astype(jnp.float32)
    if not train:
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


class SelfAttention(nn.Module):
  """Bias-free multi-head self-attention; masked keys get no weight."""

  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, s, h = x.shape
    hd = h // self.heads
    proj = functools.partial(
      _dense, h, h, ("hidden", "heads"), self.dtype, use_bias=False
    )
    # Head-major split: feature index = head * head_dim + j.
    split = lambda t: t.reshape(b, s, self.heads, hd)  # [B, S, heads, hd]
    q = split(proj("query")(x))
    k = split(proj("key")(x))
    v = split(proj("value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(hd)
    if mask is not None:
      # Finite fill: a window with no real clip yields uniform weights, no NaN.
      scores = jnp.where(mask[:, None, None, :], scores, -1e30)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, h)
    return _dense(h, h, ("heads", "hidden"), self.dtype, "out", use_bias=False)(
      out
    )


class TransformerBlock(nn.Module):
  """Post-norm block: LN(attn + x), dropout, LN(ff + x), dropout."""

  heads: int
  ff_mult: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    h = x.shape[-1]
    norm = functools.partial(
      nn.LayerNorm,
      epsilon=1e-5,
      use_fast_variance=False,
      dtype=self.dtype,
      scale_init=_partitioned(nn.initializers.ones, ("hidden",)),
      bias_init=_partitioned(nn.initializers.zeros, ("hidden",)),
    )
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = norm(name="norm1")(
      SelfAttention(self.heads, self.dtype, name="attention")(x, mask) + x
    )
    x = drop(x)
    m = self.ff_mult * h
    y = _dense(m, h, ("hidden", "mlp"), self.dtype, "ff_in")(x)  # [B, S, m]
    y = _dense(h, m, ("mlp", "hidden"), self.dtype, "ff_out")(nn.relu(y))
    return drop(norm(name="norm2")(y + x))


class TsfmCAM(nn.Module):
  """Linear(F -> hidden), one transformer block (no posemb), mean."""

  hidden: int
  heads: int
  ff_mult: int
  dropout: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    x = _dense(
      self.hidden, x.shape[-1], ("embed", "hidden"), self.dtype, "proj"
    )(x)  # [B, S, hidden]
    x = TransformerBlock(
      self.heads, self.ff_mult, self.dropout, self.dtype, name="block"
    )(x, mask, train)
    return _masked_mean(x, mask)  # [B, hidden]


class GRULayer(nn.Module):
  """One GRU layer over clips; padded steps leave the state unchanged.

  Fused gate kernels in PyTorch's order (reset, update, new):
  `input_kernel` = weight_ih.T, `hidden_kernel` = weight_hh.T.
  """

  hidden: int
  in_axis: str = "embed"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, _, f = x.shape
    h = self.hidden
    uni = _uniform(1 / math.sqrt(h))  # PyTorch: every GRU weight.
    param = lambda name, shape, names: self.param(
      name, _partitioned(uni, names), shape, jnp.float32
    )
    wi = param("input_kernel", (f, 3 * h), (self.in_axis, "gates"))
    bi = param("input_bias", (3 * h,), ("gates",))
    wh = param("hidden_kernel", (h, 3 * h), ("hidden", "gates"))
    bh = param("hidden_bias", (3 * h,), ("gates",))
    gi = x @ wi.astype(self.dtype) + bi.astype(self.dtype)  # [B, S, 3h]
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask

    def step(carry, inp):
      g, m = inp  # [B, 3h], [B]
      gh = carry @ wh.astype(self.dtype) + bh.astype(self.dtype)
      r = jax.nn.sigmoid(g[:, :h] + gh[:, :h])
      z = jax.nn.sigmoid(g[:, h : 2 * h] + gh[:, h : 2 * h])
      n = jnp.tanh(g[:, 2 * h :] + r * gh[:, 2 * h :])
      new = (1 - z) * n + z * carry
      new = jnp.where(m[:, None], new, carry)
      return new, new

    h0 = jnp.zeros((b, h), self.dtype)
    _, ys = jax.lax.scan(step, h0, (gi.swapaxes(0, 1), mask.swapaxes(0, 1)))
    return ys.swapaxes(0, 1)  # [B, S, h]


class GruCAM(nn.Module):
  """Stacked GRU, ReLU, mean over clips."""

  layers: int
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    del train
    for i in range(self.layers):
      in_axis = "embed" if i == 0 else "hidden"
      x = GRULayer(self.hidden, in_axis, self.dtype, name=f"layer_{i}")(x, mask)
    return _masked_mean(nn.relu(x), mask)  # [B, hidden]


class ConvCAM(nn.Module):
  """Conv1d stack over clips (padding 1), ReLU, avg-pool 2 between, mean.

  With a mask, padded clips are zero (as the conv's own padding) and only
  outputs computed from real clips enter the next layer and the mean, so the
  result equals running on the unpadded window.
  """

  layers: tuple[tuple[int, int], ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    del train
    length = None if mask is None else mask.sum(axis=1)  # [B] real clips
    valid = lambda t, n: (
      None if n is None else jnp.arange(t.shape[1])[None, :] < n[:, None]
    )
    zero = lambda t, m: t if m is None else t * m[..., None].astype(t.dtype)
    for i, (k, filters) in enumerate(self.layers):
      fan_in = k * x.shape[-1]
      names = (None, "embed" if i == 0 else "hidden", "channels")
      x = nn.Conv(
        filters,
        (k,),
        padding=((1, 1),),
        dtype=self.dtype,
        kernel_init=_torch_kernel(names),
        bias_init=_torch_bias(fan_in, ("channels",)),
        name=f"conv_{i}",
      )(x)  # [B, S + 3 - k, filters]
      x = nn.relu(x)
      length = None if length is None else length + 3 - k
      if i < len(self.layers) - 1:
        x = zero(x, valid(x, length))
        s = x.shape[1] // 2
        x = x[:, : 2 * s].reshape(x.shape[0], s, 2, filters).mean(axis=2)
        length = None if length is None else length // 2
        x = zero(x, valid(x, length))
    return _masked_mean(x, valid(x, length))  # [B, filters]


class Branch(nn.Module):
  """BatchNorm -> CAM -> Linear(hidden -> classes) on [B, S, F]."""

  cam: str
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool):
    x = BatchNorm(dtype=self.dtype, name="bn")(x, mask, train)
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
      x = nn.relu(_masked_mean(x, mask))
    # x: [B, hidden]
    names = ("embed" if kind == "savg" else "hidden", "classes")
    h = x.shape[-1]
    return _dense(self.num_classes, h, names, self.dtype, "head")(x)


class DIViTA(nn.Module):
  """DIViTA head over per-clip representations of one or two backbones.

  `__call__(inputs, mask, train)`: `inputs[branch]` is [B, clips, features]
  for each name in `branches`, `mask` bool [B, clips] (True = real clip).
  Returns float32 logits [B, num_classes]. Late fusion averages the logits
  of one Branch per backbone (submodules named after the branches); early
  fusion concatenates features into one Branch named "_".join(branches).
  BatchNorm statistics live in `batch_stats` (mutable when `train`);
  dropout uses the `dropout` rng.
  """

  branches: tuple[str, ...] = ("image", "video")
  fusion: str = "late"  # late | early
  cam: str = "tsfm_128_4_6_0.25"
  mask_padding: bool = True
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  def _check(self, inputs, mask):
    if self.fusion not in ("late", "early"):
      raise ValueError(f"Unknown fusion {self.fusion!r}: expected late|early.")
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
    branch = functools.partial(Branch, self.cam, self.num_classes, self.dtype)
    if self.fusion == "early":
      x = jnp.concatenate([xs[b] for b in self.branches], -1)  # [B, S, sum F]
      return branch(name="_".join(self.branches))(x, m, train).astype(
        jnp.float32
      )
    logits = [branch(name=b)(xs[b], m, train) for b in self.branches]
    return jnp.mean(jnp.stack(logits), axis=0).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Checkpoint surgery: the reference's PyTorch head -> one Branch.


def _reference_names(kind: str, kw: dict) -> dict[str, tuple[str, ...]]:
  """Reference state_dict key -> Flax path (collection first) for a CAM."""
  lin = lambda src, *dst: {
    f"{src}.weight": ("params", *dst, "kernel"),
    f"{src}.bias": ("params", *dst, "bias"),
  }
  ln = lambda src, *dst: {
    f"{src}.weight": ("params", *dst, "scale"),
    f"{src}.bias": ("params", *dst, "bias"),
  }
  names = {
    **ln("bn", "bn"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
    **lin("cls", "head"),
  }
  if kind == "tsfm":  # cam = Sequential(MoveDim, Linear, Block, Avg)
    blk = ("cam", "block")
    names.update(lin("cam.1", "cam", "proj"))
    for w, n in zip("qkvo", ("query", "key", "value", "out")):
      names[f"cam.2.attention.W_{w}.weight"] = (
        ("params",) + blk + ("attention", n, "kernel")
      )
    names.update(ln("cam.2.norm1", *blk, "norm1"))
    names.update(ln("cam.2.norm2", *blk, "norm2"))
    names.update(lin("cam.2.ff.0", *blk, "ff_in"))
    names.update(lin("cam.2.ff.2", *blk, "ff_out"))
  elif kind == "gru":  # cam = Sequential(MoveDim, GRU, ...)
    for i in range(kw["layers"]):
      for src, dst in [
        ("weight_ih", "input_kernel"),
        ("bias_ih", "input_bias"),
        ("weight_hh", "hidden_kernel"),
        ("bias_hh", "hidden_bias"),
      ]:
        names[f"cam.1.{src}_l{i}"] = ("params", "cam", f"layer_{i}", dst)
  elif kind == "conv":  # cam = Sequential([Conv, ReLU, AvgPool] *, Conv, ...)
    for i in range(len(kw["layers"])):
      names.update(lin(f"cam.{3 * i}", "cam", f"conv_{i}"))
  return names


def load_reference_branch(state_dict, cam: str, prefix: str = "") -> dict:
  """Variables of one `Branch` from the reference's `DIViTA` state_dict.

  `state_dict` maps the reference's keys (e.g. `bn.weight`, `cam.1.weight`,
  `cls.bias`; PyTorch Lightning checkpoints add `prefix="model."`) to
  arrays (torch tensors: pass `.numpy()`). Returns {"params": ...,
  "batch_stats": ...} to place under a branch name, e.g.
  `{"params": {"image": v["params"]}, "batch_stats": {"image": ...}}`.
  Missing or unexpected keys raise, naming them.
  """
  kind, kw = parse_cam(cam)
  names = _reference_names(kind, kw)
  sd = {
    k[len(prefix) :]: v
    for k, v in state_dict.items()
    if k.startswith(prefix) and not k.endswith("num_batches_tracked")
  }
  missing = sorted(set(names) - set(sd))
  unexpected = sorted(set(sd) - set(names))
  if missing or unexpected:
    raise ValueError(
      f"Reference state_dict does not match CAM {cam!r}: missing "
      f"{missing}, unexpected {unexpected}."
    )
  # Expected shapes from the Flax Branch (catches a CAM string that does
  # not match the checkpoint's sizes).
  f, classes = len(sd["bn.weight"]), len(sd["cls.bias"])
  x = jax.ShapeDtypeStruct((1, 32, f), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: nn.unbox(
      Branch(cam, classes).init(jax.random.key(0), x, None, False)
    ),
    x,
  )
  out = {}
  for key, path in names.items():
    v = np.asarray(sd[key], np.float32)
    if path[-1].endswith("kernel"):
      # torch Linear [out, in], Conv1d [out, in, k] -> [in, out], [k, in, out].
      v = v.T
    want = functools.reduce(lambda d, p: d[p], path, shapes).shape
    if v.shape != want:
      raise ValueError(
        f"Reference {key!r} gives Flax shape {v.shape} (kernels "
        f"transposed), but CAM {cam!r} expects {want}."
      )
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(v)
  return out

"""Clip aggregation modules (CAMs) of the DIViTA head: tsfm, GRU, conv.

Each maps [B, S, F] clip features (+ mask, True = real clip) to [B, hidden].
Numerics follow the public PyTorch code: LayerNorm eps 1e-5, bias-free
head-major attention, GRU gates in PyTorch order (reset, update, new),
PyTorch's default initialisation (see divita.py for the padding rules).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from divita_jax.models.axes import logical

# ---------------------------------------------------------------------------
# Initialisers: PyTorch defaults, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).


def torch_kernel(names):
  # variance_scaling(1/3, fan_in, uniform) == kaiming_uniform(a=sqrt(5)).
  return logical(
    nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), *names
  )


def _uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_bias(fan_in, names):
  return logical(_uniform(1 / math.sqrt(fan_in)), *names)


def dense(features, fan_in, names, dtype, name, use_bias=True):
  """PyTorch-style nn.Linear with logical axis names (in, out)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=torch_kernel(names),
    bias_init=torch_bias(fan_in, names[1:]),
    name=name,
  )


def masked_mean(x, mask):
  """Mean over clips ([B, S, C] -> [B, C]); mask None = all clips real."""
  if mask is None:
    return x.mean(axis=1)
  w = mask[..., None].astype(x.dtype)
  return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1)


class SelfAttention(nn.Module):
  """Bias-free multi-head self-attention; masked keys get no weight."""

  heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, s, h = x.shape
    hd = h // self.heads
    proj = functools.partial(
      dense, h, h, ("hidden", "heads"), self.dtype, use_bias=False
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
    return dense(h, h, ("heads", "hidden"), self.dtype, "out", use_bias=False)(
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
      scale_init=logical(nn.initializers.ones, "hidden"),
      bias_init=logical(nn.initializers.zeros, "hidden"),
    )
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = norm(name="norm1")(
      SelfAttention(self.heads, self.dtype, name="attention")(x, mask) + x
    )
    x = drop(x)
    m = self.ff_mult * h
    y = dense(m, h, ("hidden", "mlp"), self.dtype, "ff_in")(x)  # [B, S, m]
    y = dense(h, m, ("mlp", "hidden"), self.dtype, "ff_out")(nn.relu(y))
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
    x = dense(
      self.hidden, x.shape[-1], ("embed", "hidden"), self.dtype, "proj"
    )(x)  # [B, S, hidden]
    x = TransformerBlock(
      self.heads, self.ff_mult, self.dropout, self.dtype, name="block"
    )(x, mask, train)
    return masked_mean(x, mask)  # [B, hidden]


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
      name, logical(uni, *names), shape, jnp.float32
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
    return masked_mean(nn.relu(x), mask)  # [B, hidden]


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
        kernel_init=torch_kernel(names),
        bias_init=torch_bias(fan_in, ("channels",)),
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
    return masked_mean(x, valid(x, length))  # [B, filters]

"""Swin Transformer (2-D) and Video Swin (3-D) in Flax linen, channels-last.

One shifted-window attention core serves any number of grid axes: `Swin`
takes images [B, H, W, 3], `Swin3D` clips [B, T, H, W, 3]. The behaviour
follows torchvision's `swin_t` / `swin3d_t` exactly, including its quirks:
- grids are zero-padded (after norm1) to window multiples and the padded
  tokens are attended to, unmasked; only the cyclic-shift regions are
  masked, with -100 (not -inf);
- a grid axis no larger than the window gets no shift; the 3-D model
  (`shrink_window`) also shrinks the window to it and slices the full
  window's relative-position index to `[:vol, :vol]`, as the pretrained
  weights expect; the 2-D model keeps the window and pads instead;
- patch merging concatenates x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
  x[1::2, 1::2] (H varies first) over the last two grid axes only;
- exact GELU, LayerNorm eps 1e-5.

Parameter tree: `patch_embed/{kernel,bias}`, `patch_norm`,
`stage_{i}/block_{j}/{norm1, attn/{qkv, proj,
relative_position_bias_table}, norm2, mlp/{fc1, fc2}}`,
`stage_{i}/downsample/{norm, reduction}` (all stages but the last),
`norm`. qkv kernel [D, 3, heads, head_dim], proj kernel [heads, head_dim, D].
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block
from divita_jax.models.swin_windows import (
  attend_windows,
  pad_to,
  partition,
  relative_index_in_graph,
  unpartition,
  window_and_shift,
  window_labels,
)
from divita_jax.models.vit import layer_norm

# name -> (embed_dim, depths, num_heads); torchvision's T/S/B plus `tiny`.
_SIZES = {
  "tiny": (32, (1, 1, 2, 1), (1, 2, 4, 8)),
  "T": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
  "S": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
  "B": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}


def decode_variant(variant: str, video: bool = False) -> dict[str, Any]:
  """'T' | 'S' | 'B' | 'tiny' -> `Swin` fields (`Swin3D` with video)."""
  if variant not in _SIZES:
    raise ValueError(
      f"Unknown Swin variant {variant!r}; expected one of {sorted(_SIZES)}."
    )
  embed_dim, depths, num_heads = _SIZES[variant]
  return dict(
    embed_dim=embed_dim,
    depths=list(depths),
    num_heads=list(num_heads),
    window=[8, 7, 7] if video else [7, 7],
    patch=[2, 4, 4] if video else [4, 4],
    shrink_window=video,
    pad_input=video,
  )


def feature_dim(fields: dict[str, Any]) -> int:
  """Width of the pooled features (768 for T): doubled by each merge."""
  return fields["embed_dim"] * 2 ** (len(fields["depths"]) - 1)


# ---------------------------------------------------------------------------
# Modules.

_KERNEL = nn.initializers.truncated_normal(0.02)
_ZEROS = nn.initializers.zeros


class WindowAttention(nn.Module):
  """Shifted-window multi-head self-attention on a [B, *grid, C] map."""

  num_heads: int
  window: tuple[int, ...]  # configured window (bias table size)
  shift: tuple[int, ...]
  shrink_window: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, *grid, c = x.shape
    heads, hd = self.num_heads, c // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    window, shift = window_and_shift(
      grid, self.window, self.shift, self.shrink_window
    )
    axes = tuple(range(1, len(grid) + 1))
    x = pad_to(x, axes, window)  # unmasked, as the reference
    padded = x.shape[1:-1]
    if any(shift):
      x = jnp.roll(x, [-s for s in shift], axes)
    x = partition(x, window)  # [B, nW, N, C]
    qkv = nn.DenseGeneral(
      (3, heads, hd),
      kernel_init=logical(_KERNEL, "embed", None, "heads", "kv"),
      bias_init=logical(_ZEROS, None, "heads", "kv"),
      name="qkv",
      **kw,
    )(x)  # [B, nW, N, 3, heads, hd]
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    labels = window_labels(tuple(grid), tuple(padded), window, shift)
    y = attend_windows(q, k, v, self.bias(window), labels)
    y = nn.DenseGeneral(
      c,
      axis=(-2, -1),
      kernel_init=logical(_KERNEL, "heads", "kv", "embed"),
      bias_init=logical(_ZEROS, "embed"),
      name="proj",
      **kw,
    )(y)  # [B, nW, N, C]
    y = unpartition(y, padded, window)
    if any(shift):
      y = jnp.roll(y, shift, axes)
    return y[(slice(None), *map(slice, grid))]

  def bias(self, window):
    """[heads, N, N] relative-position bias of the (maybe shrunk) window."""
    size = int(np.prod([2 * w - 1 for w in self.window]))
    table = self.param(
      "relative_position_bias_table",
      logical(nn.initializers.truncated_normal(0.02), None, "heads"),
      (size, self.num_heads),
      self.param_dtype,
    )
    vol = int(np.prod(window))
    index = relative_index_in_graph(tuple(self.window), vol)
    return jnp.take(table, index, axis=0).transpose(2, 0, 1).astype(jnp.float32)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""

  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(
      self.hidden,
      kernel_init=logical(_KERNEL, "embed", "mlp"),
      bias_init=logical(_ZEROS, "mlp"),
      name="fc1",
      **kw,
    )(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(
      c,
      kernel_init=logical(_KERNEL, "mlp", "embed"),
      bias_init=logical(_ZEROS, "embed"),
      name="fc2",
      **kw,
    )(x)


class Block(nn.Module):
  """Pre-LN Swin block: x + WMSA(norm1(x)); x + MLP(norm2(x))."""

  num_heads: int
  window: tuple[int, ...]
  shift: tuple[int, ...]
  shrink_window: bool
  mlp_ratio: float
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layer_norm(self.eps, self.dtype, "norm1")(x)
    x = x + WindowAttention(
      self.num_heads,
      self.window,
      self.shift,
      self.shrink_window,
      name="attn",
      **kw,
    )(y)
    y = layer_norm(self.eps, self.dtype, "norm2")(x)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, name="mlp", **kw)(y)


def merge_patches(x):
  """[..., H, W, C] -> [..., ceil(H/2), ceil(W/2), 4C] in reference order."""
  x = pad_to(x, (x.ndim - 3, x.ndim - 2), (2, 2))
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // 2, 2, w // 2, 2, c)  # [..., h, i, w, j, C]
  n = len(lead)
  # Channel block k = i + 2 j: x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1).
  x = x.transpose(*range(n), n, n + 2, n + 3, n + 1, n + 4)
  return x.reshape(*lead, h // 2, w // 2, 4 * c)


class PatchMerging(nn.Module):
  """2x2 spatial merge, norm(4C), reduction to 2C (no bias)."""

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = layer_norm(self.eps, self.dtype, "norm")(merge_patches(x))
    return nn.Dense(
      2 * c,
      use_bias=False,
      kernel_init=logical(_KERNEL, "mlp", "embed"),
      name="reduction",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x)


class Stage(nn.Module):
  """`depth` blocks (shift on odd ones), then an optional patch merging."""

  depth: int
  num_heads: int
  window: tuple[int, ...]
  shrink_window: bool
  mlp_ratio: float
  eps: float
  downsample: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = remat_block(Block, self.remat)
    for j in range(self.depth):
      shift = tuple(w // 2 if j % 2 else 0 for w in self.window)
      x = block(
        self.num_heads,
        self.window,
        shift,
        self.shrink_window,
        self.mlp_ratio,
        self.eps,
        name=f"block_{j}",
        **kw,
      )(x)
    if not self.downsample:
      return x, x
    return x, PatchMerging(self.eps, name="downsample", **kw)(x)


class Swin(nn.Module):
  """Swin on images [B, H, W, 3] -> (pooled [B, D], intermediates).

  Intermediates: `stem` [B, h, w, C] (patch embedding after its norm),
  `stage_{i}` [B, h_i, w_i, C_i] (blocks' output, before merging),
  `encoded` [B, tokens, D] (after the final norm), `pooled` [B, D] (mean
  of `encoded`). Deterministic; `dtype` is the compute dtype.
  shrink_window / pad_input: torchvision 3-D rules (see module docstring;
  pad_input zero-pads the input to patch multiples instead of flooring).
  """

  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window: tuple[int, ...] = (7, 7)
  patch: tuple[int, ...] = (4, 4)
  shrink_window: bool = False
  pad_input: bool = False
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per Swin block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    rank = len(self.patch)
    if x.ndim != rank + 2 or len(self.window) != rank:
      raise ValueError(
        f"{type(self).__name__} with patch {self.patch} and window "
        f"{self.window} expects [B, {rank} grid axes, 3] input, got {x.shape}."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    patch = tuple(self.patch)
    x = x.astype(self.dtype)
    if self.pad_input:
      x = pad_to(x, range(1, rank + 1), patch)
    x = nn.Conv(
      self.embed_dim,
      patch,
      strides=patch,
      padding="VALID",  # torchvision's 2-D conv floors; 3-D padded above
      kernel_init=logical(_KERNEL, *[None] * (rank + 1), "embed"),
      bias_init=logical(_ZEROS, "embed"),
      name="patch_embed",
      **kw,
    )(x)  # [B, *grid, C]
    x = layer_norm(self.layer_norm_eps, self.dtype, "patch_norm")(x)
    out = {"stem": x}
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      out[f"stage_{i}"], x = Stage(
        depth,
        heads,
        tuple(self.window),
        self.shrink_window,
        self.mlp_ratio,
        self.layer_norm_eps,
        downsample=i < len(self.depths) - 1,
        remat=self.remat,
        name=f"stage_{i}",
        **kw,
      )(x)
    x = layer_norm(self.layer_norm_eps, self.dtype, "norm")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, tokens, D]
    out["encoded"] = x
    out["pooled"] = pooled = jnp.mean(x, axis=1, dtype=jnp.float32)
    return pooled.astype(self.dtype), out


class Swin3D(Swin):
  """Video Swin on clips [B, T, H, W, 3]; torchvision `swin3d_*` rules."""

  window: tuple[int, ...] = (8, 7, 7)
  patch: tuple[int, ...] = (2, 4, 4)
  shrink_window: bool = True
  pad_input: bool = True

"""VideoPrism video encoder (Flax linen): factorised space / time.

transformers' `VideoPrismVisionModel`: each frame is cut into 18-px
patches (a 2-D conv: its tubelet is one frame), gets a learned spatial
position table and runs through the spatial blocks; after their final
LayerNorm every patch position becomes a sequence over time, gets a
learned temporal table and runs through the temporal blocks and a second
LayerNorm. Attention logits are soft-capped: cap * tanh(logits / cap).
Last hidden states [B, T * hw, D], frame outermost; pooled = their mean.

Parameter tree: `embedding` (kernel [p, p, 3, D]),
`SpatialTransformer/{posembed_input/pos_embedding [1, hw, D],
encoderblock_{0..depth-1}, encoder_norm}`,
`TemporalTransformer/{posembed_input/pos_embedding [1, T, D],
encoderblock_{depth..depth+temporal_depth-1}, encoder_norm}`: the block
numbers run on across the two stacks so that the layer ids of layer
decay and freezing (trainers/param_groups.py) put every spatial block
before every temporal one. Blocks as ViT's (LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
MlpBlock_0). The reference's LayerNorms compute with (1 + weight): the
converter stores that sum as our `scale`.

Another input size: the tables were trained at native_resolution /
native_frames and are resized at run time as the reference's
`interpolate_pos_encoding=True` does (bilinear with antialiasing, half-
pixel centres; jax.image.resize 'linear' computes the same filter).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from divita_jax.models import vit
from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

_KERNEL = nn.initializers.lecun_normal()


def decode_variant(variant: str) -> dict[str, Any]:
  """'B/18', 'L/18' (ViT's sizes, 4 temporal blocks) or 'tiny/8' (2)."""
  fields = vit.decode_variant(variant)
  if "tubelet" in fields:
    raise ValueError(f"VideoPrism variant {variant!r}: no tubelet (1 frame).")
  fields["temporal_depth"] = 2 if variant.startswith("tiny/") else 4
  return fields


def capped_attention(q, k, v, softcap: float | None):
  """softmax(cap tanh(q k^T / (cap sqrt(hd)))) v over [B, N, heads, hd].

  One block of float32 logits: the maps are small (hw = 256 spatial
  tokens, T = 16 temporal ones at the native size).
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum(
    "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
  )
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class CappedSelfAttention(nn.Module):
  """ViT's SelfAttention layout with soft-capped logits."""

  num_heads: int
  softcap: float | None = 50.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hd = width // self.num_heads
    qkv = [  # [B, N, heads, head_dim]
      vit.head_dense(self.num_heads, hd, name, _KERNEL, **kw)(x)
      for name in ("query", "key", "value")
    ]
    y = capped_attention(*qkv, self.softcap)
    return vit.out_dense(width, _KERNEL, **kw)(y)


class Block(nn.Module):
  """Pre-LN block: x + capped MHSA(LN(x)); x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  softcap: float | None = 50.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.layer_norm_eps
    y = vit.layer_norm(eps, self.dtype, "LayerNorm_0")(x)
    y = CappedSelfAttention(
      self.num_heads, self.softcap, name="MultiHeadDotProductAttention_0", **kw
    )(y)
    x = x + y
    y = vit.layer_norm(eps, self.dtype, "LayerNorm_1")(x)
    y = vit.MlpBlock(
      self.mlp_dim, self.gelu_approximate, name="MlpBlock_0", **kw
    )(y)
    return x + y


def resize_table(table, native: tuple[int, ...], grid: tuple[int, ...]):
  """[1, prod(native), D] table -> [1, prod(grid), D], as the reference
  interpolates (identity at the native grid)."""
  if tuple(native) == tuple(grid):
    return table
  d = table.shape[-1]
  table = table.reshape(1, *native, d)
  table = jax.image.resize(
    table, (1, *grid, d), method="linear", antialias=True
  )
  return table.reshape(1, -1, d)


class PositionTable(nn.Module):
  """Adds a learned `pos_embedding` [1, prod(native), D], resized to the
  input's `grid`."""

  native: tuple[int, ...]
  grid: tuple[int, ...]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    size = 1
    for n in self.native:
      size *= n
    pe = self.param(
      "pos_embedding",
      logical(nn.initializers.normal(0.02), None, None, "embed"),
      (1, size, x.shape[-1]),
      self.param_dtype,
    )
    return x + resize_table(pe, self.native, self.grid).astype(x.dtype)


class Stack(nn.Module):
  """`posembed_input`, blocks numbered from `first`, `encoder_norm`; x
  [batch, tokens of `grid`, D]."""

  depth: int
  first: int
  native: tuple[int, ...]
  grid: tuple[int, ...]
  mlp_dim: int
  num_heads: int
  softcap: float | None
  layer_norm_eps: float
  gelu_approximate: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    x = PositionTable(
      self.native, self.grid, self.param_dtype, name="posembed_input"
    )(x.astype(self.dtype))
    block = remat_block(Block, self.remat)
    for i in range(self.first, self.first + self.depth):
      x = block(
        self.mlp_dim,
        self.num_heads,
        self.softcap,
        self.layer_norm_eps,
        self.gelu_approximate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x)
    return vit.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


class VideoPrism(nn.Module):
  """VideoPrism encoder on clips [B, T, H, W, 3] in [0, 1] -> (pooled
  [B, D], out).

  out: `stem` [B, T, h, w, D], `spatial_encoded` [B, T, hw, D] (after the
  spatial LayerNorm), `encoded` [B, T hw, D] (frame outermost, after the
  temporal LayerNorm), `pooled`. classifier 'gap' (mean) or '0' (token 0).
  softcap None: no capping; temporal_depth 0 skips the temporal blocks
  (both negative controls in the tests).
  """

  width: int
  depth: int  # spatial blocks
  mlp_dim: int
  num_heads: int
  native_resolution: int  # input side the spatial table was trained at
  native_frames: int  # frames the temporal table was trained at
  patch_size: int = 18
  temporal_depth: int = 4
  softcap: float | None = 50.0
  classifier: str = "gap"
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False  # the reference's 'gelu_python' (erf)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  def stack(self, name, depth, first, native, grid):
    return Stack(
      depth,
      first,
      native,
      grid,
      self.mlp_dim,
      self.num_heads,
      self.softcap,
      self.layer_norm_eps,
      self.gelu_approximate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      remat=self.remat,
      name=name,
    )

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5:
      raise ValueError(f"VideoPrism expects [B, T, H, W, 3], got {x.shape}.")
    b, t = x.shape[:2]
    p = self.patch_size
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      kernel_init=logical(_KERNEL, None, None, None, "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="embedding",
    )(x.reshape(b * t, *x.shape[2:]).astype(self.dtype))  # [B T, h, w, D]
    _, h, w, d = x.shape
    out = {"stem": x.reshape(b, t, h, w, d)}
    g = self.native_resolution // p
    x = self.stack("SpatialTransformer", self.depth, 0, (g, g), (h, w))(
      x.reshape(b * t, h * w, d)
    )  # [B T, hw, D]
    out["spatial_encoded"] = x.reshape(b, t, h * w, d)
    x = x.reshape(b, t, h * w, d).transpose(0, 2, 1, 3)  # [B, hw, T, D]
    x = self.stack(
      "TemporalTransformer",
      self.temporal_depth,
      self.depth,
      (self.native_frames,),
      (t,),
    )(x.reshape(b * h * w, t, d))  # [B hw, T, D]
    x = x.reshape(b, h * w, t, d).transpose(0, 2, 1, 3)
    out["encoded"] = x.reshape(b, t * h * w, d)  # frame outermost
    out["pooled"] = vit.pool_tokens(out["encoded"], self.classifier)
    return out["pooled"], out

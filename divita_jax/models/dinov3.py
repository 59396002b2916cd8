"""DINOv3 ViT image encoder (Flax linen): rotary positions, registers.

Tree: `embedding`, `cls`, `register_embed` [1, R, D] (Transformer/),
`Transformer/encoderblock_{i}` = dinov2.Block's layout (LayerNorm_0,
MultiHeadDotProductAttention_0 with query/key/value/out, LayerScale_0,
LayerNorm_1, MlpBlock_0, LayerScale_1), `Transformer/encoder_norm`.
No position table: 2-D rotary embeddings (HF `DINOv3ViTRopePositionEmbedding`)
rotate the patch tokens' queries and keys in every block, from the patch
centres in [-1, 1] of whatever grid the input has, so any resolution (a
multiple of the patch) runs with the same params.
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from divita_jax.models import dinov2, vit
from divita_jax.models.attention import attention
from divita_jax.models.remat import remat_block

_KERNEL = nn.initializers.xavier_uniform()


def rope_tables(grid, head_dim, theta, axes="hw"):
  """(cos, sin) [h*w, head_dim] for the patch grid (numpy, float32).

  Each patch's (row, col) centre in [-1, 1] times head_dim/4 frequencies
  theta**-(4k/head_dim), rows' angles first, then columns', the whole
  tiled twice (rotate-half layout). axes 'wh' swaps the two (a control).
  """
  h, w = grid
  ys = 2.0 * (np.arange(h, dtype=np.float32) + 0.5) / h - 1.0
  xs = 2.0 * (np.arange(w, dtype=np.float32) + 0.5) / w - 1.0
  coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
  if axes == "wh":
    coords = coords[:, ::-1]
  inv_freq = 1.0 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)
  angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]
  angles = np.tile(angles.reshape(len(coords), -1), 2)  # [N, head_dim]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x, cos, sin, prefix):
  """Rotary embedding on tokens prefix.. of x [B, N, heads, hd]."""
  head, x = x[:, :prefix], x[:, prefix:]
  half = x.shape[-1] // 2
  turned = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = jnp.asarray(cos, x.dtype)[None, :, None]
  sin = jnp.asarray(sin, x.dtype)[None, :, None]
  return jnp.concatenate([head, x * cos + turned * sin], axis=1)


class RopeAttention(nn.Module):
  """vit.SelfAttention's layout with rotary queries / keys (patches only)."""

  num_heads: int
  grid: tuple[int, int]
  prefix: int  # class + register tokens (not rotated)
  rope_theta: float = 100.0
  rope_axes: str = "hw"
  key_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name, bias=True):  # [B, N, heads, head_dim]
      return vit.head_dense(
        self.num_heads, head_dim, name, _KERNEL, use_bias=bias, **kw
      )(x)

    q, k, v = proj("query"), proj("key", self.key_bias), proj("value")
    cos, sin = rope_tables(self.grid, head_dim, self.rope_theta, self.rope_axes)
    q, k = (rotate(a, cos, sin, self.prefix) for a in (q, k))
    return vit.out_dense(width, _KERNEL, **kw)(attention(q, k, v))


class Block(nn.Module):
  """dinov2.Block with rotary attention."""

  mlp_dim: int
  num_heads: int
  grid: tuple[int, int]
  prefix: int
  layer_norm_eps: float = 1e-5
  mlp_act: str = "gelu"
  gated_mlp: bool = False
  rope_theta: float = 100.0
  rope_axes: str = "hw"
  key_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = vit.layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0")(x)
    y = RopeAttention(
      self.num_heads,
      self.grid,
      self.prefix,
      self.rope_theta,
      self.rope_axes,
      self.key_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="MultiHeadDotProductAttention_0",
    )(y)
    ls = dinov2.LayerScale
    x = x + ls(self.param_dtype, name="LayerScale_0")(y)
    y = vit.layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_1")(x)
    y = dinov2.mlp(self, y)
    return x + ls(self.param_dtype, name="LayerScale_1")(y)


class Encoder(nn.Module):
  """Registers after cls, the blocks, `encoder_norm`."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_registers: int
  layer_norm_eps: float
  mlp_act: str
  gated_mlp: bool
  rope_theta: float
  rope_axes: str
  key_bias: bool
  dtype: Any
  param_dtype: Any
  remat: str
  grid: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    r = self.num_registers
    if r:
      reg = dinov2.prefix_tokens(self, "register_embed", r, len(x))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    block = remat_block(Block, self.remat)
    for i in range(self.depth):
      x = block(
        self.mlp_dim,
        self.num_heads,
        self.grid,
        1 + r,
        self.layer_norm_eps,
        self.mlp_act,
        self.gated_mlp,
        self.rope_theta,
        self.rope_axes,
        self.key_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x)
    return vit.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


ENCODER_FIELDS = [
  f for f in Encoder.__dataclass_fields__ if f not in ("grid", "parent", "name")
]


class DINOv3(nn.Module):
  """DINOv3 ViT on images [B, H, W, 3] -> (pooled [B, D], intermediates).

  pooled = the normed class token (HF `pooler_output`); `encoded` [B, 1 +
  R + h*w, D] (class, registers, patches), `patches` [B, h*w, D].
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  num_registers: int = 4
  layer_norm_eps: float = 1e-5
  mlp_act: str = "gelu"
  gated_mlp: bool = False
  rope_theta: float = 100.0
  rope_axes: str = "hw"  # 'wh' only as a negative control
  key_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    x, grid = dinov2.patch_embed(self, x)
    cls = dinov2.prefix_tokens(self, "cls", 1, x.shape[0])
    x = jnp.concatenate([cls, x], axis=1)
    x = Encoder(
      **{f: getattr(self, f) for f in ENCODER_FIELDS},
      grid=grid,
      name="Transformer",
    )(x)
    out = {"encoded": x, "patches": x[:, 1 + self.num_registers :]}
    return x[:, 0], out


# name -> (width, depth, mlp_dim, num_heads); DINOv3 ViT sizes + `tiny`.
SIZES = {
  "tiny": (64, 2, 128, 4),
  "S": (384, 12, 1536, 6),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
}


def decode_variant(variant: str) -> dict:
  """'B/16' (or 'B': patch 16) -> model fields, 4 registers."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not (patch or "16").isdigit():
    raise ValueError(
      f"Unknown DINOv3 variant {variant!r}; SIZE[/PATCH] with SIZE in "
      f"{sorted(SIZES)}, e.g. 'B/16'."
    )
  width, depth, mlp_dim, heads = SIZES[size]
  return dict(
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=heads,
    patch_size=int(patch or 16),
  )

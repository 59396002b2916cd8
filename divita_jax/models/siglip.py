"""SigLIP vision tower (Flax linen), pooled by its attention-pooling head.

The encoder is our ViT's arithmetic (pre-LN blocks, tanh GELU, eps 1e-6,
no class token) with ViT's names: `embedding`, `Transformer/posembed_input/
pos_embedding` [1, g*g, D], `Transformer/encoderblock_{i}` (vit.
Encoder1DBlock), `Transformer/encoder_norm`. The pooled feature is
big_vision's MAP head `MAPHead_0` (`probe` [1, 1, D], one cross-attention
of the probe over the tokens, then probe + MLP(LN(probe))), i.e. HF
`SiglipVisionModel.pooler_output`.

The stored table stays at the checkpoint's grid (`posemb_grid`); another
input grid resizes it at run time with torch's bicubic (align_corners
False), as HF's `interpolate_pos_encoding=True`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models import dinov2, vit
from divita_jax.models.attention import attention
from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

_KERNEL = nn.initializers.xavier_uniform()


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over tokens."""

  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param(
      "probe",
      logical(_KERNEL, None, None, "embed"),
      (1, 1, width),
      self.param_dtype,
    )
    probe = jnp.tile(probe.astype(x.dtype), (b, 1, 1))  # [B, 1, D]
    y = CrossAttention(
      self.num_heads, name="MultiHeadDotProductAttention_0", **kw
    )(probe, x)
    z = vit.layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0")(y)
    z = vit.MlpBlock(
      self.mlp_dim, self.gelu_approximate, name="MlpBlock_0", **kw
    )(z)
    return (y + z)[:, 0]  # [B, D]


class CrossAttention(nn.Module):
  """Queries from the probe, keys / values from the tokens; vit.
  SelfAttention's layout (query/key/value [D, heads, hd], out)."""

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, probe, x):
    width = x.shape[-1]
    hd = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name, y):  # [B, tokens, heads, hd]
      return vit.head_dense(self.num_heads, hd, name, _KERNEL, **kw)(y)

    y = attention(proj("query", probe), proj("key", x), proj("value", x))
    return vit.out_dense(width, _KERNEL, **kw)(y)  # [B, 1, D]


class SigLIP(nn.Module):
  """SigLIP vision tower on images [B, H, W, 3] -> (pooled [B, D], out).

  pooled: the MAP head's output (HF `pooler_output`); out: `encoded`
  [B, h*w, D] (after the post-LayerNorm, HF `last_hidden_state`).
  `pool` 'map' (the model's own), or 'mean' / 'token' (controls only).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  posemb_grid: int = 14  # side of the stored position-embedding grid
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  pool: str = "map"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, grid = dinov2.patch_embed(self, x)
    x = Encoder(
      self.depth,
      self.mlp_dim,
      self.num_heads,
      self.posemb_grid,
      self.layer_norm_eps,
      self.gelu_approximate,
      grid,
      remat=self.remat,
      name="Transformer",
      **kw,
    )(x)
    out = {"encoded": x}
    if self.pool == "mean":
      return x.mean(axis=1), out
    if self.pool == "token":
      return x[:, 0], out
    pooled = MAPHead(
      self.mlp_dim,
      self.num_heads,
      self.layer_norm_eps,
      self.gelu_approximate,
      name="MAPHead_0",
      **kw,
    )(x)
    return pooled, out


class Encoder(nn.Module):
  """Resized posemb (`posembed_input`), vit blocks, `encoder_norm`."""

  depth: int
  mlp_dim: int
  num_heads: int
  posemb_grid: int
  layer_norm_eps: float
  gelu_approximate: bool
  grid: tuple[int, int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    n = self.posemb_grid
    pe = dinov2.PosEmb(n * n, x.shape[-1], name="posembed_input")()
    pe = dinov2.resize_grid(pe, n, self.grid, "bicubic")
    x = x + pe.astype(x.dtype)  # [B, h*w, D]
    block = remat_block(vit.Encoder1DBlock, self.remat)
    for i in range(self.depth):
      x = block(
        self.mlp_dim,
        self.num_heads,
        self.layer_norm_eps,
        self.gelu_approximate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x)
    return vit.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


# name -> (width, depth, mlp_dim, num_heads); SigLIP's sizes + `tiny`.
SIZES = {
  "tiny": (64, 2, 128, 4),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "So400m": (1152, 27, 4304, 16),
}


def decode_variant(variant: str) -> dict:
  """'B/16' (or 'B': patch 16) -> model fields; the table of a 224-px
  checkpoint (14 x 14 for patch 16), 4 x 4 for `tiny`."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not (patch or "16").isdigit():
    raise ValueError(
      f"Unknown SigLIP variant {variant!r}; SIZE[/PATCH] with SIZE in "
      f"{sorted(SIZES)}, e.g. 'B/16'."
    )
  width, depth, mlp_dim, heads = SIZES[size]
  p = int(patch or 16)
  return dict(
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=heads,
    patch_size=p,
    posemb_grid=4 if size == "tiny" else 224 // p,
  )

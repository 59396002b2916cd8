"""V-JEPA 2 video encoder (Flax linen): tubelets, 3-D rotary attention.

The encoder of transformers' `VJEPA2Model` (no predictor, no attentive
pooler): a tubelet embedding (Conv3d, tubelet 2 x patch 16, no position
table), pre-LN blocks whose queries and keys are rotated by the token's
(time, height, width) coordinates, a final LayerNorm; pooled = mean of the
last hidden states. Parameter tree as the ViT's: `embedding` (kernel
[pt, ph, pw, 3, D]), `Transformer/encoderblock_{i}/{LayerNorm_0,
MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
MlpBlock_0}`, `Transformer/encoder_norm`, with ViT's logical axis names.

Rotary embedding (V-JEPA's own form, which the reference keeps): the head
dim is cut into three segments of s = 2 * (head_dim // 3 // 2) dims for
time, height and width (the rest is not rotated). In a segment at
position p, dim j is multiplied by cos(p w_{j mod s/2}) and its pair
partner (dims 2i, 2i + 1 swapped, the first negated) by sin(...), w_k =
10000^(-k / (s/2)). Positions are integers of the actual token grid, so
any frame count works; the reference takes the grid side from its
config's crop_size, so at another resolution it is not a grid at all and
we differ from it there (the token grid is what the rotation means).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from divita_jax.models import vit
from divita_jax.models.attention import attention
from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

_KERNEL = nn.initializers.truncated_normal(0.02)
# ViT-g of V-JEPA 2 (mlp ratio 48/11); the other sizes are ViT's (L, H).
_GIANT = dict(width=1408, depth=40, mlp_dim=6144, num_heads=22)
ROPE_AXES = "thw"  # the segment order of the checkpoints


def decode_variant(variant: str) -> dict[str, Any]:
  """'L/16' (ViT's sizes, or 'g/16'; 'tiny/8' for tests) -> model fields;
  'L/16x2' also names the tubelet (default 2)."""
  giant = variant.startswith("g/")
  fields = vit.decode_variant("B" + variant[1:] if giant else variant)
  if giant:
    fields.update(_GIANT)
  fields.setdefault("tubelet", 2)
  return fields


def rope_tables(grid, head_dim: int, axes: str = ROPE_AXES):
  """(cos, sin) [T' h w, head_dim] float32 for a (T', h, w) token grid,
  tokens time outermost; `axes` orders the segments (t, h, w)."""
  seg = 2 * (head_dim // 3 // 2)
  coords = np.stack(
    np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), -1
  ).reshape(-1, 3)  # [N, (t, h, w)]
  omega = 1.0 / 10000 ** (np.arange(seg // 2) / (seg / 2))
  omega = np.tile(omega, 2)  # dim j uses frequency j mod seg/2
  angles = [coords[:, "thw".index(a), None] * omega for a in axes]
  rest = np.zeros((coords.shape[0], head_dim - 3 * seg))
  angles = np.concatenate([*angles, rest], axis=1)  # [N, head_dim]
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate(x, cos, sin):
  """x [B, N, heads, hd] * cos + pair-swapped x * sin (tables [N, hd])."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  swapped = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
  cos = jnp.asarray(cos, x.dtype)[:, None]
  sin = jnp.asarray(sin, x.dtype)[:, None]
  return x * cos + swapped * sin


class RopeSelfAttention(nn.Module):
  """ViT's SelfAttention layout with 3-D rotary queries and keys."""

  num_heads: int
  grid: tuple[int, int, int]
  rope_axes: str = ROPE_AXES
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = [  # [B, N, heads, head_dim]
      vit.head_dense(self.num_heads, head_dim, name, _KERNEL, **kw)(x)
      for name in ("query", "key", "value")
    ]
    cos, sin = rope_tables(self.grid, head_dim, self.rope_axes)
    y = attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
    return vit.out_dense(width, _KERNEL, **kw)(y)


class Block(nn.Module):
  """Pre-LN block: x + RoPE-MHSA(LN(x)); x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  grid: tuple[int, int, int]
  rope_axes: str = ROPE_AXES
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.layer_norm_eps
    y = vit.layer_norm(eps, self.dtype, "LayerNorm_0")(x)
    y = RopeSelfAttention(
      self.num_heads,
      self.grid,
      self.rope_axes,
      name="MultiHeadDotProductAttention_0",
      **kw,
    )(y)
    x = x + y
    y = vit.layer_norm(eps, self.dtype, "LayerNorm_1")(x)
    y = vit.MlpBlock(
      self.mlp_dim, self.gelu_approximate, name="MlpBlock_0", **kw
    )(y)
    return x + y


class Encoder(nn.Module):
  """`depth` RoPE blocks (`encoderblock_{i}`) and `encoder_norm`."""

  depth: int
  mlp_dim: int
  num_heads: int
  grid: tuple[int, int, int]
  rope_axes: str = ROPE_AXES
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    block = remat_block(Block, self.remat)
    for i in range(self.depth):
      x = block(
        self.mlp_dim,
        self.num_heads,
        self.grid,
        self.rope_axes,
        self.layer_norm_eps,
        self.gelu_approximate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x)
    return vit.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


class VJEPA2(nn.Module):
  """V-JEPA 2 encoder on clips [B, T, H, W, 3] -> (pooled [B, D], out).

  T a multiple of the tubelet (any count: the rotary positions extend);
  out: `stem` [B, T', h, w, D], `encoded` [B, T' h w, D] (after the final
  LayerNorm, time outermost), `pooled`. classifier 'gap' (mean over the
  tokens: the reference has no pooled output) or '0' (token 0, a control).
  rope_axes: which coordinate each third of the head dim rotates by.
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  tubelet: int = 2
  classifier: str = "gap"
  rope_axes: str = ROPE_AXES
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = False  # the reference's 'gelu' is exact (erf)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5 or x.shape[1] % self.tubelet:
      raise ValueError(
        f"VJEPA2 expects [B, T, H, W, 3] clips with T a multiple of "
        f"tubelet {self.tubelet}, got {x.shape}."
      )
    if sorted(self.rope_axes) != sorted(ROPE_AXES):
      raise ValueError(f"rope_axes {self.rope_axes!r}: a permutation of thw.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t, p = self.tubelet, self.patch_size
    x = nn.Conv(
      self.width,
      (t, p, p),
      strides=(t, p, p),
      padding="VALID",
      kernel_init=logical(_KERNEL, *[None] * 4, "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      name="embedding",
      **kw,
    )(x.astype(self.dtype))  # [B, T', h, w, D]
    out = {"stem": x}
    b, nt, h, w, d = x.shape
    x = Encoder(
      self.depth,
      self.mlp_dim,
      self.num_heads,
      (nt, h, w),
      self.rope_axes,
      self.layer_norm_eps,
      self.gelu_approximate,
      remat=self.remat,
      name="Transformer",
      **kw,
    )(x.reshape(b, nt * h * w, d))  # time outermost, then rows, columns
    out["encoded"] = x
    out["pooled"] = vit.pool_tokens(x, self.classifier)
    return out["pooled"], out

"""DINOv2 (and DINOv2 with registers) image encoder, Flax linen.

Same tree as our ViT where the arithmetic is the same (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}`
with LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0,
`Transformer/encoder_norm`), plus what DINOv2 adds: `LayerScale_{0,1}`
per block, `register_embed` [1, R, D] (registers variant) and an optional
SwiGLU MLP (`MlpBlock_0/{gate, up, down}`).

Position embeddings stay at the checkpoint's grid (`posemb_grid`, 37 for
the 518-px tables) and are resized at run time to the input's patch grid,
as `Dinov2Model.interpolate_pos_encoding` does: torch's bicubic
(align_corners=False), with antialias for the registers variant. So any
resolution that is a multiple of the patch runs; `load_backbone(dir,
resolution=...)` needs no surgery.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from divita_jax.models import vit
from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

# HF hidden_act -> jax activation.
ACTS = {
  "gelu": functools.partial(nn.gelu, approximate=False),
  "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
  "silu": nn.silu,
  "swish": nn.silu,
}
# name -> (width, depth, num_heads); DINOv2's sizes plus `tiny`.
SIZES = {
  "tiny": (64, 2, 4),
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
  "g": (1536, 40, 24),
}


def _cubic(x, a):
  """Keys' cubic convolution kernel (torch: a=-0.75; antialias a=-0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _linear(x):
  return np.maximum(0.0, 1.0 - np.abs(x))


def _plain_matrix(n_in, n_out, method):
  """[n_out, n_in] weights of torch interpolate (align_corners=False)."""
  scale = n_in / n_out
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  if method == "bilinear":
    src = np.maximum(src, 0.0)  # torch clamps only the linear modes
  x0 = np.floor(src).astype(int)
  taps = range(-1, 3) if method == "bicubic" else range(0, 2)
  m = np.zeros((n_out, n_in))
  for o in taps:
    t = src - (x0 + o)
    w = _cubic(t, -0.75) if method == "bicubic" else _linear(t)
    np.add.at(m, (np.arange(n_out), np.clip(x0 + o, 0, n_in - 1)), w)
  return m


def _antialias_matrix(n_in, n_out):
  """[n_out, n_in] weights of torch bicubic with antialias=True (PIL's
  filter: support widened by the downscale, weights renormalised)."""
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    m[i, lo:hi] = w / w.sum()
  return m


@functools.cache
def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """Interpolation weights [n_out, n_in] (float32) of torch's
  `interpolate(mode=..., align_corners=False)`; method: bicubic,
  bicubic_antialias or bilinear."""
  if method == "bicubic_antialias":
    m = _antialias_matrix(n_in, n_out)
  elif method in ("bicubic", "bilinear"):
    m = _plain_matrix(n_in, n_out, method)
  else:
    raise ValueError(
      f"Unknown posemb interpolation {method!r}; bicubic | "
      "bicubic_antialias | bilinear."
    )
  return m.astype(np.float32)


def resize_grid(pe, old: int, new: tuple[int, int], method: str):
  """[1, old*old, D] table -> [1, new_h*new_w, D] (separable resize)."""
  if (old, old) == tuple(new):
    return pe
  grid = pe.reshape(old, old, -1).astype(jnp.float32)
  mh = jnp.asarray(resize_matrix(old, new[0], method))
  mw = jnp.asarray(resize_matrix(old, new[1], method))
  hi = jax.lax.Precision.HIGHEST
  grid = jnp.einsum("ih,hwd->iwd", mh, grid, precision=hi)
  grid = jnp.einsum("jw,iwd->ijd", mw, grid, precision=hi)
  return grid.reshape(1, new[0] * new[1], -1)


class LayerScale(nn.Module):
  """x * scale, one learned factor per channel (`scale` [D])."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale", logical(nn.initializers.ones, "embed"), x.shape[-1:]
    )
    return x * scale.astype(x.dtype)


class GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)): DINOv2 SwiGLU, DINOv3 gated MLP."""

  mlp_dim: int
  act: str = "silu"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(
      dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias
    )
    inner = dict(
      kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
      bias_init=logical(nn.initializers.zeros, "mlp"),
      **kw,
    )
    gate = nn.Dense(self.mlp_dim, name="gate", **inner)(x)
    up = nn.Dense(self.mlp_dim, name="up", **inner)(x)
    return nn.Dense(
      x.shape[-1],
      kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      name="down",
      **kw,
    )(ACTS[self.act](gate) * up)


class Mlp(nn.Module):
  """Dense_0 -> act -> Dense_1 (vit.MlpBlock's names) for non-GELU acts."""

  mlp_dim: int
  act: str = "silu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.Dense(
      self.mlp_dim,
      kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
      bias_init=logical(nn.initializers.zeros, "mlp"),
      name="Dense_0",
      **kw,
    )(x)
    return nn.Dense(
      x.shape[-1],
      kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      name="Dense_1",
      **kw,
    )(ACTS[self.act](y))


def mlp(block, x):
  """The block's MLP, named MlpBlock_0: gated, vit.MlpBlock (GELU) or
  plain."""
  kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
  act = block.mlp_act
  if block.gated_mlp:
    return GatedMlp(block.mlp_dim, act, name="MlpBlock_0", **kw)(x)
  if act.startswith("gelu"):
    tanh = act == "gelu_pytorch_tanh"
    return vit.MlpBlock(block.mlp_dim, tanh, name="MlpBlock_0", **kw)(x)
  return Mlp(block.mlp_dim, act, name="MlpBlock_0", **kw)(x)


class Block(nn.Module):
  """x + LS(MHSA(LN(x))); x + LS(MLP(LN(x))) (DINOv2's LayerScale block)."""

  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  mlp_act: str = "gelu"
  gated_mlp: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = vit.layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0")(x)
    y = vit.SelfAttention(
      self.num_heads, name="MultiHeadDotProductAttention_0", **kw
    )(y)
    x = x + LayerScale(self.param_dtype, name="LayerScale_0")(y)
    y = vit.layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_1")(x)
    y = mlp(self, y)
    return x + LayerScale(self.param_dtype, name="LayerScale_1")(y)


def patch_embed(module, x):
  """Conv patch embedding `embedding` -> ([B, h*w, D], (h, w))."""
  p = module.patch_size
  x = nn.Conv(
    module.width,
    (p, p),
    strides=(p, p),
    padding="VALID",
    kernel_init=logical(nn.initializers.lecun_normal(), *[None] * 3, "embed"),
    bias_init=logical(nn.initializers.zeros, "embed"),
    dtype=module.dtype,
    param_dtype=module.param_dtype,
    name="embedding",
  )(x.astype(module.dtype))  # [B, h, w, D]
  b, h, w, d = x.shape
  return x.reshape(b, h * w, d), (h, w)  # row-major patch order


def prefix_tokens(module, name, count, batch):
  """A learned [1, count, D] table of `module`, tiled over the batch."""
  t = module.param(
    name,
    logical(nn.initializers.normal(0.02), None, None, "embed"),
    (1, count, module.width),
    module.param_dtype,
  )
  return jnp.tile(t.astype(module.dtype), (batch, 1, 1))


class DINOv2(nn.Module):
  """DINOv2 on images [B, H, W, 3] -> (pooled [B, D], intermediates).

  pooled = the normed class token (HF `pooler_output`); `encoded` [B, 1 +
  R + h*w, D] after the final norm (class, registers, patches), `patches`
  [B, h*w, D]. Deterministic (no dropout, no drop-path).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 14
  posemb_grid: int = 37  # side of the stored position-embedding grid
  num_registers: int = 0
  layer_norm_eps: float = 1e-6
  mlp_act: str = "gelu"
  gated_mlp: bool = False
  posemb_interpolation: str = "bicubic"  # or bicubic_antialias (registers)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    x, grid = patch_embed(self, x)
    b = x.shape[0]
    x = jnp.concatenate([prefix_tokens(self, "cls", 1, b), x], axis=1)
    x = Encoder(
      **{f: getattr(self, f) for f in ENCODER_FIELDS},
      grid=grid,
      name="Transformer",
    )(x)
    out = {"encoded": x, "patches": x[:, 1 + self.num_registers :]}
    return x[:, 0], out


class Encoder(nn.Module):
  """Resized posemb on [cls, patches] (`posembed_input`), registers after
  cls, the blocks, `encoder_norm`."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  posemb_grid: int
  num_registers: int
  layer_norm_eps: float
  mlp_act: str
  gated_mlp: bool
  posemb_interpolation: str
  dtype: Any
  param_dtype: Any
  remat: str
  grid: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    n = self.posemb_grid
    pe = PosEmb(1 + n * n, self.width, name="posembed_input")()
    patches = resize_grid(pe[:, 1:], n, self.grid, self.posemb_interpolation)
    table = jnp.concatenate([pe[:, :1], patches], axis=1)
    x = x + table.astype(x.dtype)  # [B, 1 + h*w, D]
    if self.num_registers:
      reg = prefix_tokens(self, "register_embed", self.num_registers, len(x))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    block = remat_block(Block, self.remat)
    for i in range(self.depth):
      x = block(
        self.mlp_dim,
        self.num_heads,
        self.layer_norm_eps,
        self.mlp_act,
        self.gated_mlp,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"encoderblock_{i}",
      )(x)
    return vit.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


ENCODER_FIELDS = [
  f for f in Encoder.__dataclass_fields__ if f not in ("grid", "parent", "name")
]


class PosEmb(nn.Module):
  """The stored table `pos_embedding` [1, tokens, D] (checkpoint grid)."""

  tokens: int
  width: int

  @nn.compact
  def __call__(self):
    return self.param(
      "pos_embedding",
      logical(nn.initializers.normal(0.02), None, None, "embed"),
      (1, self.tokens, self.width),
    )


def decode_variant(variant: str) -> dict:
  """'B/14' (or 'B': patch 14) -> model fields (MLP ratio 4; the 37 x 37
  table of the 518-px checkpoints, 4 x 4 for `tiny`)."""
  size, _, patch = variant.partition("/")
  if size not in SIZES or not (patch or "14").isdigit():
    raise ValueError(
      f"Unknown DINOv2 variant {variant!r}; SIZE[/PATCH] with SIZE in "
      f"{sorted(SIZES)}, e.g. 'B/14'."
    )
  width, depth, heads = SIZES[size]
  return dict(
    width=width,
    depth=depth,
    mlp_dim=4 * width,
    num_heads=heads,
    patch_size=int(patch or 14),
    posemb_grid=4 if size == "tiny" else 37,
  )

"""Scenic-style ViT (Flax linen) with checkpoint-compatible parameter names.

Parameter tree (Scenic `baselines/vit.py`, vit_jax after pre-linen renaming):
`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0}`, `Transformer/encoder_norm`, optional `pre_logits`
and `output_projection`. Every parameter carries logical axis names
(embed, mlp, heads, kv) for the trainer's sharding rules.
"""

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models.attention import attention
from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

# name -> (width, depth, mlp_dim, num_heads); big_vision's table plus `tiny`.
_SIZES = {
  "tiny": (64, 2, 128, 4),
  "Ti": (192, 12, 768, 3),
  "S": (384, 12, 1536, 6),
  "M": (512, 12, 2048, 8),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """'B/16' -> model fields; 'B/16x2' also gives the tubelet length (ViViT)."""
  m = re.fullmatch(r"(\w+)/(\d+)(?:x(\d+))?", variant)
  if m is None or m.group(1) not in _SIZES:
    raise ValueError(
      f"Unknown backbone variant {variant!r}; expected SIZE/PATCH or "
      f"SIZE/PATCHxTUBELET with SIZE in {sorted(_SIZES)}, e.g. 'B/16'."
    )
  width, depth, mlp_dim, num_heads = _SIZES[m.group(1)]
  out = dict(
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    patch_size=int(m.group(2)),
  )
  if m.group(3):
    out["tubelet"] = int(m.group(3))
  return out


_DEFAULT_KERNEL = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros
_ONES = nn.initializers.ones


def layer_norm(eps: float, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    scale_init=logical(_ONES, "embed"),
    bias_init=logical(_ZEROS, "embed"),
    name=name,
  )


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(width), names Dense_0 / Dense_1."""

  mlp_dim: int
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Dense(
      self.mlp_dim,
      kernel_init=logical(_DEFAULT_KERNEL, "embed", "mlp"),
      bias_init=logical(nn.initializers.normal(1e-6), "mlp"),
      name="Dense_0",
      **kw,
    )(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    return nn.Dense(
      width,
      kernel_init=logical(_DEFAULT_KERNEL, "mlp", "embed"),
      bias_init=logical(nn.initializers.normal(1e-6), "embed"),
      name="Dense_1",
      **kw,
    )(x)


def head_dense(num_heads, head_dim, name, kernel_init=_DEFAULT_KERNEL, **kw):
  """D -> [heads, head_dim]: a query / key / value projection in flax
  MHDPA's layout with its logical axes (call inside a compact module).
  kw: DenseGeneral's (dtype, param_dtype, use_bias)."""
  return nn.DenseGeneral(
    (num_heads, head_dim),
    kernel_init=logical(kernel_init, "embed", "heads", "kv"),
    bias_init=logical(_ZEROS, "heads", "kv"),
    name=name,
    **kw,
  )


def out_dense(width, kernel_init=_DEFAULT_KERNEL, **kw):
  """[heads, head_dim] -> D: the attention's `out` projection."""
  return nn.DenseGeneral(
    width,
    axis=(-2, -1),
    kernel_init=logical(kernel_init, "heads", "kv", "embed"),
    bias_init=logical(_ZEROS, "embed"),
    name="out",
    **kw,
  )


class SelfAttention(nn.Module):
  """Multi-head self-attention with flax MHDPA's parameter layout.

  query/key/value kernels [D, heads, head_dim], out kernel [heads, head_dim,
  D], so Scenic and vit_jax trees load as they are.
  """

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} not divisible by {self.num_heads}.")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = [  # [B, N, heads, head_dim]
      head_dense(self.num_heads, head_dim, name, **kw)(x)
      for name in ("query", "key", "value")
    ]
    return out_dense(width, **kw)(attention(*qkv))


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)); x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_0")(x)
    y = SelfAttention(
      self.num_heads, name="MultiHeadDotProductAttention_0", **kw
    )(y)
    x = x + y
    y = layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, self.gelu_approximate, name="MlpBlock_0", **kw)(
      y
    )
    return x + y


class Encoder(nn.Module):
  """Learned posemb (`posembed_input`), `depth` blocks, `encoder_norm`."""

  depth: int
  mlp_dim: int
  num_heads: int
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    # x: [B, tokens, D]
    x = AddPositionEmbs(param_dtype=self.param_dtype, name="posembed_input")(x)
    x = x.astype(self.dtype)
    block = remat_block(Encoder1DBlock, self.remat)
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
    return layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)


class AddPositionEmbs(nn.Module):
  """Adds a learned table `pos_embedding` [1, tokens, D] (sized at init).

  Another input size needs a resampled table (load_backbone(resolution=)):
  flax raises ScopeParamShapeError on a mismatch.
  """

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pe = self.param(
      "pos_embedding",
      logical(nn.initializers.normal(0.02), None, None, "embed"),
      (1,) + x.shape[1:],
      self.param_dtype,
    )
    return x + pe.astype(x.dtype)


def pool_tokens(x, classifier: str):
  """'token'/'0': token 0; 'gap': mean over tokens (after encoder_norm)."""
  if classifier in ("token", "0"):
    return x[:, 0]
  if classifier == "gap":
    return jnp.mean(x, axis=1)
  raise ValueError(f"Unknown classifier {classifier!r}; token | 0 | gap.")


def head(module, pooled, out, kw):
  """Optional pre_logits (Dense + tanh) and output_projection; in place."""
  out["pooled"] = pooled
  if module.representation_size:
    pooled = nn.tanh(
      nn.Dense(
        module.representation_size,
        kernel_init=logical(_DEFAULT_KERNEL, "embed", "mlp"),
        bias_init=logical(_ZEROS, "mlp"),
        name="pre_logits",
        **kw,
      )(pooled)
    )
  out["pre_logits"] = pooled
  if module.num_classes:
    out["logits"] = nn.Dense(
      module.num_classes,
      kernel_init=logical(_ZEROS, "embed", "classes"),
      bias_init=logical(_ZEROS, "classes"),
      name="output_projection",
      **kw,
    )(pooled)
  return pooled


class ViT(nn.Module):
  """ViT on images [B, H, W, 3] -> (features [B, D'], intermediates).

  features = pre_logits output when representation_size is set, else the
  pooled encoder output. Intermediates: `stem` [B, h, w, D], `encoded`
  [B, tokens, D] (after encoder_norm, class token first), `pooled`,
  `pre_logits`, `logits` (num_classes only). Deterministic (no dropout).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  classifier: str = "token"
  representation_size: int | None = None
  num_classes: int | None = None
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      kernel_init=logical(nn.initializers.lecun_normal(), *[None] * 3, "embed"),
      bias_init=logical(_ZEROS, "embed"),
      name="embedding",
      **kw,
    )(x.astype(self.dtype))  # [B, h, w, D]
    out = {"stem": x}
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # row-major patch order
    x = add_cls(self, x, "cls")
    x = Encoder(
      self.depth,
      self.mlp_dim,
      self.num_heads,
      self.layer_norm_eps,
      self.gelu_approximate,
      remat=self.remat,
      name="Transformer",
      **kw,
    )(x)
    out["encoded"] = x
    pooled = pool_tokens(x, self.classifier)
    return head(self, pooled, out, kw), out


def add_cls(module, x, name):
  """Prepends a learned class token [1, 1, D] for token classifiers."""
  if module.classifier not in ("token", "0"):
    return x
  cls = module.param(
    name,
    logical(_ZEROS, None, None, "embed"),
    (1, 1, x.shape[-1]),
    module.param_dtype,
  )
  cls = jnp.tile(cls.astype(x.dtype), (x.shape[0], 1, 1))
  return jnp.concatenate([cls, x], axis=1)  # [B, 1 + tokens, D]

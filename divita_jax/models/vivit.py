"""Scenic-style ViViT (Flax linen): tubelet embedding, two variants.

- 'spatio_temporal' (Scenic Model 1, HF `google/vivit-b-16x2-kinetics400`):
  one encoder over all T'*H'*W' tokens (time outermost) plus `cls`. Tree:
  `embedding` (kernel [pt, ph, pw, 3, D]), `cls`, `Transformer/...` exactly
  as the ViT.
- 'factorized_encoder' (Scenic Model 2): `SpatialTransformer` per frame
  (`cls_SpatialTransformer`), pooled per frame, then `TemporalTransformer`
  over time (`cls_TemporalTransformer`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models import vit
from divita_jax.models.axes import logical


class ViViT(nn.Module):
  """ViViT on clips [B, T, H, W, 3] -> (features [B, D'], intermediates).

  Intermediates: `stem` [B, T', h, w, D], `encoded` (final normalised
  tokens: [B, 1 + T'h w, D] spatio_temporal, [B, 1 + T', D] factorized
  encoder, no leading class token with 'gap'), `pooled`, `pre_logits`,
  `logits`. Deterministic (no dropout).
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  tubelet: int = 2
  model_type: str = "spatio_temporal"
  temporal_depth: int = 4  # factorized_encoder only.
  # factorized_encoder: Scenic sizes its temporal transformer separately;
  # None = the spatial one's.
  temporal_num_heads: int | None = None
  temporal_mlp_dim: int | None = None
  classifier: str = "token"
  representation_size: int | None = None
  num_classes: int | None = None
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  def encoder(self, depth, name, mlp_dim=None, num_heads=None):
    return vit.Encoder(
      depth,
      mlp_dim or self.mlp_dim,
      num_heads or self.num_heads,
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
      raise ValueError(f"ViViT expects [B, T, H, W, 3] clips, got {x.shape}.")
    if x.shape[1] % self.tubelet:
      raise ValueError(
        f"{x.shape[1]} frames are not a multiple of tubelet {self.tubelet}."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t, p = self.tubelet, self.patch_size
    x = nn.Conv(
      self.width,
      (t, p, p),
      strides=(t, p, p),
      padding="VALID",
      kernel_init=logical(nn.initializers.lecun_normal(), *[None] * 4, "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      name="embedding",
      **kw,
    )(x.astype(self.dtype))  # [B, T', h, w, D]
    out = {"stem": x}
    b, nt, h, w, d = x.shape
    if self.model_type == "spatio_temporal":
      x = x.reshape(b, nt * h * w, d)  # time outermost, then rows, columns
      x = vit.add_cls(self, x, "cls")
      x = self.encoder(self.depth, "Transformer")(x)
    elif self.model_type == "factorized_encoder":
      x = x.reshape(b * nt, h * w, d)  # [B*T', hw, D]: frames as batch
      x = vit.add_cls(self, x, "cls_SpatialTransformer")
      x = self.encoder(self.depth, "SpatialTransformer")(x)
      out["spatial_encoded"] = x.reshape(b, nt, -1, d)
      x = vit.pool_tokens(x, self.classifier).reshape(b, nt, d)
      x = vit.add_cls(self, x, "cls_TemporalTransformer")
      x = self.encoder(
        self.temporal_depth,
        "TemporalTransformer",
        self.temporal_mlp_dim,
        self.temporal_num_heads,
      )(x)
    else:
      raise ValueError(
        f"Unknown ViViT model_type {self.model_type!r}; "
        "spatio_temporal | factorized_encoder."
      )
    out["encoded"] = x
    pooled = vit.pool_tokens(x, self.classifier)
    return vit.head(self, pooled, out, kw), out

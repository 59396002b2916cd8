"""R(2+1)D (torchvision video layout) in Flax linen.

Parameter tree follows torchvision's names with '.' -> '_': `stem_{0,1,3,4}`,
`layer{i}_{j}/{conv1_0_0, conv1_0_1, conv1_0_3, conv1_1, conv2_0_0, ...,
downsample_0, downsample_1}`: conv{1,2}_0_0 is the (1,3,3) spatial conv,
_0_1 its BatchNorm, _0_3 the (3,1,1) temporal conv, conv{1,2}_1 the block's
BatchNorm.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models.remat import remat_block
from divita_jax.models.resnet import conv_bn

VARIANTS = {"r2plus1d_18": (2, 2, 2, 2), "r2plus1d_34": (3, 4, 6, 3)}


def decode_variant(variant: str) -> dict[str, Any]:
  """'r2plus1d_18' -> R2Plus1D fields."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown R(2+1)D {variant!r}; {sorted(VARIANTS)}.")
  return dict(depths=VARIANTS[variant])


def mid_width(inplanes: int, planes: int) -> int:
  """Width between the factorised convs: as many parameters as one full
  3x3x3 conv from inplanes to planes (torchvision's formula)."""
  return (inplanes * planes * 27) // (inplanes * 9 + 3 * planes)


def conv2plus1d(x, features, mid, stride, prefix, dtype):
  """(1,3,3) conv to `mid`, BN, ReLU, (3,1,1) conv: space then time."""
  x = conv_bn(
    x, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1),
    names=(f"{prefix}_0_0", f"{prefix}_0_1"), dtype=dtype, relu=True,
  )  # fmt: skip
  return conv_bn(
    x, features, (3, 1, 1), (stride, 1, 1), (1, 0, 0),
    names=(f"{prefix}_0_3", f"{prefix}_1"), dtype=dtype, relu=False,
  )  # fmt: skip


class Block(nn.Module):
  """Basic block of two (2+1)D convs; the mid width comes once from
  (inplanes, planes) and both convs use it (conv2's own (planes, planes)
  would differ: 288 vs 230 in layer2.0)."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, s, d = self.planes, self.stride, self.dtype
    mid = mid_width(x.shape[-1], p)
    y = nn.relu(conv2plus1d(x, p, mid, s, "conv1", d))
    y = conv2plus1d(y, p, mid, 1, "conv2", d)
    if s != 1 or x.shape[-1] != p:
      # The shortcut strides time too: (s, s, s).
      names = ("downsample_0", "downsample_1")
      x = conv_bn(x, p, 1, s, 0, names=names, dtype=d, relu=False)
    return nn.relu(x + y)


class R2Plus1D(nn.Module):
  """Clips [B, T, H, W, 3] -> (pooled [B, 512], intermediates).

  Time halves at layer2..layer4 (24 -> 12 -> 6 -> 3), space at the stem and
  layer2..layer4 (112 -> 56 -> 28 -> 14 -> 7). Intermediates: `stem`,
  `layer1`..`layer4`, `encoded` (= layer4), `pooled`. No classifier.
  """

  depths: Sequence[int] = (2, 2, 2, 2)
  dtype: Any = jnp.float32
  remat: str = "none"  # per residual block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    if x.ndim != 5:
      raise ValueError(f"R(2+1)D takes [B, T, H, W, 3] clips, got {x.shape}.")
    d = self.dtype
    x = conv_bn(
      x, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), names=("stem_0", "stem_1"),
      dtype=d, relu=True,
    )  # fmt: skip
    x = conv_bn(
      x,
      64,
      (3, 1, 1),
      1,
      (1, 0, 0),
      names=("stem_3", "stem_4"),
      dtype=d,
      relu=True,
    )  # fmt: skip  [B, T, H/2, W/2, 64]
    out = {"stem": x}
    block = remat_block(Block, self.remat)
    for i, depth in enumerate(self.depths):
      for j in range(depth):
        stride = 2 if i and not j else 1
        x = block(64 * 2**i, stride, d, name=f"layer{i + 1}_{j}")(x)
      out[f"layer{i + 1}"] = x
    out["encoded"] = x  # [B, t, h, w, 512]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    out["pooled"] = pooled
    return pooled, out

"""ShuffleNet-V2 in 2-D (torchvision) and 3-D (Efficient-3DCNNs).

One module covers both: the topology is the same (repeats [4, 8, 4]), the
3-D net has 3x3x3 kernels, a (1, 2, 2) stem stride, and its max pool and
every stage's first block also stride 2 in time (T: 16 -> 8 -> 4 -> 2 -> 1).

Parameter tree follows torchvision's names with '.' -> '_': `conv1_0`,
`conv1_1`, `stage{2,3,4}_{j}/{branch1_k,branch2_k}`, `conv5_0`, `conv5_1`
(k = index in torch's Sequential). The converter renames for
Efficient-3DCNNs (`features.{i}`, `banch`, `conv_last`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models.remat import remat_block
from divita_jax.models.resnet import Conv, batch_norm, conv_bn, max_pool

# Stage widths [stem, stage2, stage3, stage4, conv5] per width multiplier.
# The two sources differ at 2.0x (stage2 244 vs 224) and only
# Efficient-3DCNNs has 0.25x.
TORCHVISION_WIDTHS = {
  0.5: (24, 48, 96, 192, 1024),
  1.0: (24, 116, 232, 464, 1024),
  1.5: (24, 176, 352, 704, 1024),
  2.0: (24, 244, 488, 976, 2048),
}
EFFICIENT3D_WIDTHS = {
  0.25: (24, 32, 64, 128, 1024),
  0.5: (24, 48, 96, 192, 1024),
  1.0: (24, 116, 232, 464, 1024),
  1.5: (24, 176, 352, 704, 1024),
  2.0: (24, 224, 488, 976, 2048),
}


def decode_variant(width: float, dims: int) -> dict[str, Any]:
  """Width multiplier and 2 (torchvision) | 3 (Efficient-3DCNNs) -> fields."""
  table = {2: TORCHVISION_WIDTHS, 3: EFFICIENT3D_WIDTHS}.get(dims)
  if table is None or width not in table:
    raise ValueError(
      f"No ShuffleNet-V2 {width}x in {dims}-D; 2-D widths "
      f"{sorted(TORCHVISION_WIDTHS)}, 3-D {sorted(EFFICIENT3D_WIDTHS)}."
    )
  return dict(widths=table[width], dims=dims)


def channel_shuffle(x):
  """torch's channel_shuffle(groups=2) on the last axis: the two halves
  interleave, channel g * C/2 + i -> 2 * i + g."""
  *lead, c = x.shape
  x = x.reshape(*lead, 2, c // 2)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


class InvertedResidual(nn.Module):
  """Stride 1: split channels, the first half passes, the second goes
  through branch2. Stride 2: branch1 and branch2 both see all of x."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  def branch2(self, x):
    c, s, d = self.features // 2, self.stride, self.dtype
    x = conv_bn(
      x, c, 1, 1, 0, names=("branch2_0", "branch2_1"), dtype=d, relu=True
    )
    x = Conv(c, 3, s, 1, depthwise=True, dtype=d, name="branch2_3")(x)
    x = batch_norm("branch2_4", d)(x)
    return conv_bn(
      x, c, 1, 1, 0, names=("branch2_5", "branch2_6"), dtype=d, relu=True
    )

  def branch1(self, x):
    c, s, d = x.shape[-1], self.stride, self.dtype
    x = Conv(c, 3, s, 1, depthwise=True, dtype=d, name="branch1_0")(x)
    x = batch_norm("branch1_1", d)(x)
    return conv_bn(
      x, self.features // 2, 1, 1, 0, names=("branch1_2", "branch1_3"),
      dtype=d, relu=True,
    )  # fmt: skip

  @nn.compact
  def __call__(self, x):
    if self.stride == 1:
      x1, x2 = jnp.split(x, 2, axis=-1)
      x = jnp.concatenate([x1, self.branch2(x2)], axis=-1)
    else:
      x = jnp.concatenate([self.branch1(x), self.branch2(x)], axis=-1)
    return channel_shuffle(x)  # [B, (T,) H, W, features]


class ShuffleNetV2(nn.Module):
  """Images [B, H, W, 3] (dims=2) or clips [B, T, H, W, 3] (dims=3) ->
  (pooled [B, widths[-1]], intermediates).

  Intermediates: `stem` (after the max pool), `stage2`..`stage4`,
  `encoded` (conv5 output), `pooled` (mean over (T,) H, W). No classifier.
  """

  widths: Sequence[int] = (24, 116, 232, 464, 1024)
  repeats: Sequence[int] = (4, 8, 4)
  dims: int = 2
  dtype: Any = jnp.float32
  remat: str = "none"  # per unit (InvertedResidual); a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    if x.ndim != self.dims + 2:
      raise ValueError(f"{self.dims}-D ShuffleNet got input {x.shape}.")
    widths, d = tuple(self.widths), self.dtype
    stem_stride = (1, 2, 2) if self.dims == 3 else 2
    names = ("conv1_0", "conv1_1")
    x = conv_bn(
      x, widths[0], 3, stem_stride, 1, names=names, dtype=d, relu=True
    )
    x = max_pool(x, 3, 2, 1)  # [B, (T/2,) H/4, W/4, widths[0]]
    out = {"stem": x}
    unit = remat_block(InvertedResidual, self.remat)
    for i, (reps, w) in enumerate(zip(self.repeats, widths[1:-1])):
      for j in range(reps):
        x = unit(w, 1 if j else 2, d, name=f"stage{i + 2}_{j}")(x)
      out[f"stage{i + 2}"] = x
    names = ("conv5_0", "conv5_1")
    x = conv_bn(x, widths[-1], 1, 1, 0, names=names, dtype=d, relu=True)
    out["encoded"] = x  # [B, (t,) h, w, widths[-1]]
    pooled = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))
    out["pooled"] = pooled
    return pooled, out

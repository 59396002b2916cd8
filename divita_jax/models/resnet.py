"""ResNet (torchvision v1.5 layout) and the conv layers of the ConvNets.

Parameter tree mirrors torchvision's module names with '.' -> '_':
`conv1`, `bn1`, `layer{i}_{j}/{conv1,bn1,...,downsample_0,downsample_1}`,
so the converter maps names by one rule. BatchNorm runs in eval mode on the
`batch_stats` collection (running mean/var, eps 1e-5 as torch).

`Conv` is shared by shufflenet.py and r2plus1d.py. Its padding is always
explicit and symmetric as in torch: Flax's 'SAME' pads (0, 1) for stride 2
where torch pads (1, 1). It lowers each kernel shape to what XLA's CPU
backend runs fastest (measured on 2 shared cores, jax 0.10.2):
- 1x1 kernels: a strided slice and a matmul (2x faster than a conv).
- depthwise kernels: a sum of shifted slices times per-channel weights
  (XLA's feature_group_count conv is ~25x slower than this on CPU).
- 3-D kernels: frames folded into the batch ((1,k,k)), space folded into
  width ((k,1,1)), or one 2-D conv per temporal tap: XLA's 3-D conv is
  4-5x slower than the same work as 2-D convs.
"""

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from divita_jax.models.axes import logical
from divita_jax.models.remat import remat_block

Ints = int | Sequence[int]
_ZEROS = nn.initializers.zeros
_ONES = nn.initializers.ones
# torchvision's ResNet init (kaiming normal, fan_out); only for random init.
_KERNEL = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# name -> (block, depths); torchvision's ResNet table.
VARIANTS = {
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
  "resnet101": ("bottleneck", (3, 4, 23, 3)),
  "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """'resnet50' -> ResNet fields."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ResNet {variant!r}; {sorted(VARIANTS)}.")
  block, depths = VARIANTS[variant]
  return dict(depths=depths, block=block)


def _ntuple(v: Ints, n: int) -> tuple[int, ...]:
  return tuple(v) if isinstance(v, Sequence) else (v,) * n


def conv_pads(kernel, strides, padding):
  """torch's symmetric zero padding as lax (low, high) pairs."""
  del kernel, strides  # torch pads the same on both sides for any stride.
  return tuple((p, p) for p in padding)


def _taps(x, kernel, strides):
  """Strided windows of padded x, one per kernel tap: tap -> [B, *out, C]."""
  nd = len(kernel)
  out = [(x.shape[1 + d] - kernel[d]) // strides[d] + 1 for d in range(nd)]
  for tap in itertools.product(*(range(k) for k in kernel)):
    idx = tuple(
      slice(t, t + s * (o - 1) + 1, s) for t, s, o in zip(tap, strides, out)
    )
    yield tap, x[(slice(None), *idx)]


def _pad(x, pads):
  if not any(lo or hi for lo, hi in pads):
    return x
  return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _conv2d(x, w, strides, pads):
  return jax.lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _conv3d(x, w, strides, pads):
  """3-D conv as 2-D convs (XLA CPU's 3-D conv is several times slower)."""
  (kt, kh, kw), (st, sh, sw) = w.shape[:3], strides
  if kh == kw == 1 and pads[1:] == ((0, 0), (0, 0)):
    # (k,1,1): space folded into the width axis, one 2-D conv.
    x = x[:, :, ::sh, ::sw]  # [B, T, H', W', C]
    b, t, h, wd, c = x.shape
    y = _conv2d(x.reshape(b, t, h * wd, c), w[:, 0], (st, 1), (pads[0], (0, 0)))
    return y.reshape(b, y.shape[1], h, wd, -1)  # [B, T', H', W', O]
  x = _pad(x, (pads[0], (0, 0), (0, 0)))
  t_out = (x.shape[1] - kt) // st + 1
  y = 0.0
  for i in range(kt):
    # One 2-D conv per temporal tap, frames folded into the batch.
    xi = x[:, i : i + st * (t_out - 1) + 1 : st]  # [B, T', H, W, C]
    b = xi.shape[0]
    yi = _conv2d(xi.reshape(-1, *xi.shape[2:]), w[i], (sh, sw), pads[1:])
    y = y + yi.reshape(b, t_out, *yi.shape[1:])
  return y  # [B, T', H', W', O]


def conv(x, w, strides, pads, depthwise=False):
  """Channels-last conv; w [*kernel, in/groups, out] (Flax layout)."""
  kernel = w.shape[:-2]
  if depthwise:
    y = 0.0
    for tap, xs in _taps(_pad(x, pads), kernel, strides):
      y = y + xs * w[tap][0]
    return y
  if all(k == 1 for k in kernel):
    x = _pad(x, pads)[(slice(None), *(slice(None, None, s) for s in strides))]
    return x @ w.reshape(w.shape[-2:])
  if len(kernel) == 3:
    return _conv3d(x, w, strides, pads)
  return _conv2d(x, w, strides, pads)


class Conv(nn.Module):
  """torch-style conv without bias: explicit symmetric padding, groups 1
  or depthwise (groups = in = out channels). Kernel [*k, in/groups, out]."""

  features: int
  kernel: Ints
  strides: Ints = 1
  padding: Ints = 0
  depthwise: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nd = x.ndim - 2
    kernel = _ntuple(self.kernel, nd)
    strides = _ntuple(self.strides, nd)
    pads = conv_pads(kernel, strides, _ntuple(self.padding, nd))
    if self.depthwise and x.shape[-1] != self.features:
      raise ValueError(f"Depthwise conv {x.shape[-1]} -> {self.features}.")
    cin = 1 if self.depthwise else x.shape[-1]
    names = (None,) * nd + ("embed", "mlp")
    w = self.param(
      "kernel",
      logical(_KERNEL, *names),
      (*kernel, cin, self.features),
      jnp.float32,
    )
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    return conv(x, w, strides, pads, self.depthwise)


def batch_norm(name: str, dtype: Any) -> nn.BatchNorm:
  """Eval-mode BatchNorm on `batch_stats` (torch's eps)."""
  return nn.BatchNorm(
    use_running_average=True,
    epsilon=1e-5,
    dtype=dtype,
    scale_init=logical(_ONES, "mlp"),
    bias_init=logical(_ZEROS, "mlp"),
    name=name,
  )


def max_pool(x, kernel: int, stride: int, padding: int):
  """torch MaxPool (-inf padding) over every axis between batch and C."""
  nd = x.ndim - 2
  pads = ((padding, padding),) * nd
  return nn.max_pool(x, (kernel,) * nd, (stride,) * nd, pads)


def conv_bn(x, features, kernel, strides, padding, *, names, dtype, relu):
  """Conv, eval BatchNorm and optional ReLU; names = (conv, bn)."""
  x = Conv(features, kernel, strides, padding, dtype=dtype, name=names[0])(x)
  x = batch_norm(names[1], dtype)(x)
  return nn.relu(x) if relu else x


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here, v1.5) -> 1x1 x4, projection shortcut."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(conv_bn, dtype=self.dtype)
    p, s = self.planes, self.stride
    y = cb(x, p, 1, 1, 0, names=("conv1", "bn1"), relu=True)
    y = cb(y, p, 3, s, 1, names=("conv2", "bn2"), relu=True)
    y = cb(y, 4 * p, 1, 1, 0, names=("conv3", "bn3"), relu=False)
    if s != 1 or x.shape[-1] != 4 * p:
      names = ("downsample_0", "downsample_1")
      x = cb(x, 4 * p, 1, s, 0, names=names, relu=False)
    return nn.relu(x + y)


class BasicBlock(nn.Module):
  """3x3 (stride) -> 3x3, projection shortcut (resnet18/34)."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cb = functools.partial(conv_bn, dtype=self.dtype)
    p, s = self.planes, self.stride
    y = cb(x, p, 3, s, 1, names=("conv1", "bn1"), relu=True)
    y = cb(y, p, 3, 1, 1, names=("conv2", "bn2"), relu=False)
    if s != 1 or x.shape[-1] != p:
      names = ("downsample_0", "downsample_1")
      x = cb(x, p, 1, s, 0, names=names, relu=False)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Images [B, H, W, 3] -> (pooled [B, D], intermediates).

  D = 8 * width (basic) or 32 * width (bottleneck): 2048 for resnet50.
  Intermediates: `stem` (after the max pool), `layer1`..`layer4`,
  `encoded` (= layer4, [B, H/32, W/32, D]), `pooled`. No classifier.
  """

  depths: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"  # bottleneck | basic
  width: int = 64
  dtype: Any = jnp.float32
  remat: str = "none"  # per residual block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    blocks = {"bottleneck": Bottleneck, "basic": BasicBlock}
    if self.block not in blocks:
      raise ValueError(f"Unknown block {self.block!r}; {sorted(blocks)}.")
    block = remat_block(blocks[self.block], self.remat)
    names = ("conv1", "bn1")
    x = conv_bn(
      x, self.width, 7, 2, 3, names=names, dtype=self.dtype, relu=True
    )
    x = max_pool(x, 3, 2, 1)  # [B, H/4, W/4, width]
    out = {"stem": x}
    for i, depth in enumerate(self.depths):
      for j in range(depth):
        stride = 2 if i and not j else 1
        x = block(
          self.width * 2**i, stride, self.dtype, name=f"layer{i + 1}_{j}"
        )(x)
      out[f"layer{i + 1}"] = x
    out["encoded"] = x  # [B, h, w, D]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["pooled"] = pooled
    return pooled, out

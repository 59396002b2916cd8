"""Swin's shifted windows: static window geometry (numpy, once per traced
shape) and windowed attention, for any number of grid axes (models/swin.py).

The shift mask adds `MASK_VALUE` (-100, the reference's; -inf would change
the softmax) between tokens of different cyclic-shift regions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -100.0


# ---------------------------------------------------------------------------
# Static window geometry (numpy, computed once per traced shape).


@functools.cache
def relative_position_index(window: tuple[int, ...]) -> np.ndarray:
  """[vol, vol] index into the bias table, as torchvision builds it."""
  coords = np.stack(np.meshgrid(*map(np.arange, window), indexing="ij"))
  coords = coords.reshape(len(window), -1)  # [axes, vol]
  rel = coords[:, :, None] - coords[:, None, :]  # [axes, vol, vol]
  index = np.zeros(rel.shape[1:], np.int64)
  for axis, w in enumerate(window):  # mixed radix, first axis slowest
    index = index * (2 * w - 1) + rel[axis] + w - 1
  return index


def relative_index_in_graph(window, vol):
  """`relative_position_index(window)[:vol, :vol]` built by XLA ops.

  Only the [vol, axes] coordinates are a constant; a [vol, vol] one
  bloats the compiled program.
  """
  coords = jnp.asarray(np.stack(np.unravel_index(np.arange(vol), window), -1))
  rel = coords[:, None, :] - coords[None, :, :]  # [vol, vol, axes]
  strides = np.cumprod([1] + [2 * w - 1 for w in window[:0:-1]])[::-1]
  offset = np.dot(np.subtract(window, 1), strides)
  return rel @ jnp.asarray(strides, jnp.int32) + int(offset)


def window_and_shift(grid, window, shift, shrink):
  """The reference's per-axis rule for this block's window and shift."""
  window, shift = list(window), list(shift)
  for i, n in enumerate(grid):
    if n <= window[i]:  # 2-D: same as "window >= padded size"
      shift[i] = 0
      if shrink:
        window[i] = n
  return tuple(window), tuple(shift)


@functools.cache
def shift_regions(padded, window, shift) -> np.ndarray:
  """[windows, vol] int32 region label of each token of each window."""
  regions = np.zeros(padded, np.int32)
  slices = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
  for count, combo in enumerate(np.ndindex(*[3] * len(padded))):
    # Same slice tuples as the reference: with a zero shift, (-0, None)
    # covers the whole axis and later regions overwrite earlier ones.
    regions[tuple(slice(*slices[a][k]) for a, k in enumerate(combo))] = count
  return partition(regions[None, ..., None], window)[0, :, :, 0]


def window_labels(grid, padded, window, shift):
  """[windows, vol] labels, or None: attention across labels gets -100.

  Only the shift regions are labelled: the padding beyond `grid` is
  attended to, unmasked, as in the reference (masking it changes the
  features). Labels, not a dense [windows, vol, vol] mask, keep the
  compiled constants small (a dense one is 78 MB for 24x224 clips).
  """
  del grid  # deliberately unused; see above
  return shift_regions(padded, window, shift) if any(shift) else None


def partition(x, window):
  """[B, *grid, C] -> [B, windows, vol, C], windows in grid order."""
  b, *grid, c = x.shape
  r = len(grid)
  split = [d for n, w in zip(grid, window) for d in (n // w, w)]
  x = x.reshape(b, *split, c)
  perm = [0, *range(1, 2 * r, 2), *range(2, 2 * r + 1, 2), 2 * r + 1]
  return x.transpose(perm).reshape(b, -1, int(np.prod(window)), c)


def unpartition(x, grid, window):
  """Inverse of `partition` -> [B, *grid, C]."""
  b, _, _, c = x.shape
  r = len(grid)
  x = x.reshape(b, *[n // w for n, w in zip(grid, window)], *window, c)
  perm = [0, *[p for i in range(r) for p in (1 + i, 1 + r + i)], 2 * r + 1]
  return x.transpose(perm).reshape(b, *grid, c)


def pad_to(x, axes, multiples):
  """Zero-pads grid axes (at the end) up to multiples."""
  pads = [(0, 0)] * x.ndim
  for a, m in zip(axes, multiples):
    pads[a] = (0, -x.shape[a] % m)
  return jnp.pad(x, pads) if any(p[1] for p in pads) else x


# ---------------------------------------------------------------------------
# Attention.

# Logits bytes per sequential block of windows: Video Swin's 392-token
# windows make stage-0 logits 236 MB per 24-frame clip; in 8 MB blocks
# (cache-sized, as models/attention.py) the attention runs ~2x faster on
# CPU. Smaller maps (2-D Swin at small batch) take one block.
BLOCK_BYTES = 8 << 20


def _attend(q, k, v, bias, labels):
  """softmax(q k^T + bias + mask) v over [B, nW, N, heads, hd] windows."""
  logits = jnp.einsum(
    "bwqhd,bwkhd->bwhqk", q, k, preferred_element_type=jnp.float32
  )  # [B, nW, heads, N, N]
  logits = logits + bias[None, None]
  if labels is not None:
    same = labels[:, :, None] == labels[:, None, :]  # [nW, N, N]
    logits = logits + jnp.where(same, 0.0, MASK_VALUE)[None, :, None]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v)


def attend_windows(q, k, v, bias, labels, block_bytes=BLOCK_BYTES):
  """`_attend` looped (lax.map) over blocks of windows, never the batch."""
  b, nw, n, h, hd = q.shape
  per_window = b * h * n * n * 4
  fits = [d for d in range(1, nw + 1) if nw % d == 0]
  chunk = max([d for d in fits if d * per_window <= block_bytes] or [1])
  if labels is not None:
    labels = jnp.asarray(labels)  # compared in-graph: small constant
  if chunk == nw:
    return _attend(q, k, v, bias, labels)
  groups = nw // chunk

  def split(a):  # [B, nW, ...] -> [groups, B, chunk, ...]
    return a.reshape(b, groups, chunk, *a.shape[2:]).swapaxes(0, 1)

  xs = (split(q), split(k), split(v))
  if labels is None:
    y = jax.lax.map(lambda t: _attend(*t, bias, None), xs)
  else:
    xs += (labels.reshape(groups, chunk, n),)
    y = jax.lax.map(lambda t: _attend(*t[:3], bias, t[3]), xs)
  return y.swapaxes(0, 1).reshape(b, nw, n, h, hd)

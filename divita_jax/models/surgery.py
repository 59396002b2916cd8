"""Checkpoint surgery on plain param trees: posemb resampling, 2-D -> 3-D.

Resampling method (one, everywhere): `scipy.ndimage.zoom(order=1)` on the
token grid, i.e. linear interpolation with aligned corners, as vit_jax
`interpolate_posembed`, Scenic `_merge_params` / ViViT
`interpolate_positional_embeddings` and big_vision `resample_posemb`. It
differs from HF's run-time bicubic and from `jax.image.resize`.
"""

from typing import Any

import numpy as np
import scipy.ndimage

Params = dict[str, Any]


def resample_posemb(
  posemb: np.ndarray,
  old_grid: tuple[int, ...],
  new_grid: tuple[int, ...],
  num_prefix: int,
) -> np.ndarray:
  """[1, prefix + prod(old_grid), D] -> [1, prefix + prod(new_grid), D].

  The grid may be 1-D (time), 2-D (rows, cols) or 3-D (time, rows, cols),
  flattened row-major (time outermost). Prefix tokens (class token) are
  kept unchanged.
  """
  posemb = np.asarray(posemb)
  d = posemb.shape[-1]
  if posemb.shape[1] != num_prefix + int(np.prod(old_grid)):
    raise ValueError(
      f"posemb {posemb.shape} does not hold {num_prefix} prefix tokens + "
      f"grid {old_grid}."
    )
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  grid = grid.astype(np.float32).reshape(*old_grid, d)
  zoom = [n / o for n, o in zip(new_grid, old_grid)] + [1.0]
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  assert grid.shape[:-1] == tuple(new_grid), (grid.shape, new_grid)
  grid = grid.reshape(1, -1, d).astype(posemb.dtype)
  return np.concatenate([prefix, grid], axis=1)


def tile_posemb(
  posemb: np.ndarray, num_prefix: int, num_time: int
) -> np.ndarray:
  """Repeats the spatial grid num_time times, time outermost (Scenic 'tile')."""
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  return np.concatenate([prefix, np.tile(grid, (1, num_time, 1))], axis=1)


def inflate_kernel(kernel: np.ndarray, tubelet: int, method: str) -> np.ndarray:
  """[ph, pw, C, D] -> [pt, ph, pw, C, D] (Scenic frame initialisers).

  'central': the 2-D kernel at time index pt // 2, zeros elsewhere.
  'average': the 2-D kernel repeated pt times divided by pt.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"Expected a 2-D patch kernel [ph,pw,C,D], {kernel.shape}")
  if method == "central":
    out = np.zeros((tubelet,) + kernel.shape, kernel.dtype)
    out[tubelet // 2] = kernel
    return out
  if method == "average":
    return np.repeat(kernel[None], tubelet, axis=0) / tubelet
  raise ValueError(f"Unknown kernel init {method!r}; central | average.")


def vit_to_vivit(
  vit_params: Params,
  vivit_params: Params,
  *,
  vit_grid: tuple[int, int],
  vivit_grid: tuple[int, int, int],
  kernel_init: str = "central",
) -> Params:
  """Initialises a ViViT tree from a ViT tree (Scenic initialise_from_*).

  vivit_params: a freshly initialised ViViT tree (spatio_temporal or
  factorized_encoder) giving target shapes and the parts a ViT lacks
  (temporal transformer, head). vit_grid: the ViT's patch grid (h, w);
  vivit_grid: (T', h', w'). Posemb: the grid is resized to (h', w') and
  tiled T' times; the class entry is kept when both have one.
  Unlike Scenic, the factorized encoder's `cls_SpatialTransformer` is
  taken from the ViT `cls` (Scenic keeps it random).
  """
  out = dict(vivit_params)
  pt = vivit_params["embedding"]["kernel"].shape[0]
  out["embedding"] = {
    "kernel": inflate_kernel(
      vit_params["embedding"]["kernel"], pt, kernel_init
    ),
    "bias": np.asarray(vit_params["embedding"]["bias"]),
  }
  factorized = "SpatialTransformer" in vivit_params
  enc_name = "SpatialTransformer" if factorized else "Transformer"
  cls_name = "cls_SpatialTransformer" if factorized else "cls"
  src_prefix = int("cls" in vit_params)
  dst_prefix = int(cls_name in vivit_params)
  target_pe = vivit_params[enc_name]["posembed_input"]["pos_embedding"]
  pe = vit_params["Transformer"]["posembed_input"]["pos_embedding"]
  pe = resample_posemb(pe, vit_grid, vivit_grid[1:], src_prefix)
  if not factorized:
    pe = tile_posemb(pe, src_prefix, vivit_grid[0])
  if src_prefix and not dst_prefix:
    pe = pe[:, 1:]
  elif dst_prefix and not src_prefix:
    pe = np.concatenate([np.asarray(target_pe)[:, :1], pe], axis=1)
  if src_prefix and dst_prefix:
    out[cls_name] = np.asarray(vit_params["cls"])
  enc = {k: v for k, v in vit_params["Transformer"].items()}
  enc["posembed_input"] = {"pos_embedding": pe}
  if set(enc) != set(vivit_params[enc_name]):
    raise ValueError(
      f"ViT encoder {sorted(enc)} does not match ViViT {enc_name} "
      f"{sorted(vivit_params[enc_name])}: different depth?"
    )
  out[enc_name] = enc
  return out

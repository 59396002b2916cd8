"""Scenic msgpack checkpoints, and the model read from any Scenic tree.

Every ViT / ViViT source is mapped to Scenic's parameter names first, so
`infer_model` reads the architecture from any of them.
"""

import os
import re

import numpy as np

from divita_jax.convert.tree import (
  ConversionError,
  Flat,
  renumber_pre_linen,
  to_f32,
)


def read_scenic(path: str) -> Flat:
  """Scenic flax msgpack checkpoint file -> flat Scenic tree."""
  from flax import serialization, traverse_util

  if os.path.isdir(path):
    path = os.path.join(path, "checkpoint")
  try:
    with open(path, "rb") as f:
      state = serialization.msgpack_restore(f.read())
  except Exception as e:
    raise ConversionError(
      f"{path}: not a readable flax msgpack checkpoint "
      f"({type(e).__name__}: {e})."
    ) from e
  tree = state
  for keys in (("optimizer", "target"), ("params",)):
    sub = state
    for k in keys:
      sub = sub.get(k) if isinstance(sub, dict) else None
    if sub is not None:
      tree = sub
      break
  if isinstance(tree, dict) and "params" in tree and "embedding" not in tree:
    tree = tree["params"]  # Nested optimizer/target/params (pre-linen era).
  if not isinstance(tree, dict):
    raise ConversionError(f"{path}: no parameter tree found.")
  flat = traverse_util.flatten_dict(tree, sep="/")
  return renumber_pre_linen({k: to_f32(v) for k, v in flat.items()})


def _need(flat: Flat, key: str, what: str) -> np.ndarray:
  if key not in flat:
    raise ConversionError(
      f"Missing key {key!r}: not a {what} checkpoint? Keys: "
      f"{sorted(flat)[:12]}{' ...' if len(flat) > 12 else ''}"
    )
  return flat[key]


def infer_model(
  flat: Flat,
  kind: str,
  resolution: int | None = None,
  num_frames: int | None = None,
) -> tuple[dict, int, int]:
  """Model fields, resolution and frames read from the tree's shapes."""
  kernel = _need(flat, "embedding/kernel", kind)
  want = 4 if kind == "vit" else 5
  if kernel.ndim != want:
    raise ConversionError(
      f"Wrong architecture: embedding/kernel {kernel.shape} is "
      f"{kernel.ndim}-D, a {kind} has a {want}-D patch kernel."
    )
  factorized = any(k.startswith("SpatialTransformer/") for k in flat)
  enc = "SpatialTransformer" if factorized else "Transformer"
  blocks = {
    m.group(1)
    for k in flat
    if (m := re.match(enc + r"/encoderblock_(\d+)/", k))
  }
  q = _need(
    flat,
    f"{enc}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
    kind,
  )
  mlp = _need(flat, f"{enc}/encoderblock_0/MlpBlock_0/Dense_0/kernel", kind)
  cls = "cls_SpatialTransformer" if factorized else "cls"
  model = dict(
    width=q.shape[0],
    depth=len(blocks),
    mlp_dim=mlp.shape[1],
    num_heads=q.shape[1],
    patch_size=kernel.shape[-3],
    classifier="token" if cls in flat else "gap",
  )
  if kernel.shape[-3] != kernel.shape[-4]:
    raise ConversionError(f"Non-square patches {kernel.shape} unsupported.")
  if "pre_logits/kernel" in flat:
    model["representation_size"] = flat["pre_logits/kernel"].shape[1]
  if "output_projection/kernel" in flat:
    model["num_classes"] = flat["output_projection/kernel"].shape[1]
  prefix = int(model["classifier"] == "token")
  pe = _need(flat, f"{enc}/posembed_input/pos_embedding", kind)
  n = pe.shape[1] - prefix
  if kind == "vivit":
    model["tubelet"] = kernel.shape[0]
    model["model_type"] = (
      "factorized_encoder" if factorized else "spatio_temporal"
    )
  if factorized:
    tblocks = {
      m.group(1)
      for k in flat
      if (m := re.match(r"TemporalTransformer/encoderblock_(\d+)/", k))
    }
    model["temporal_depth"] = len(tblocks)
    # The temporal transformer has sizes of its own (Scenic configures its
    # heads and MLP separately): read them from its shapes.
    tq = _need(
      flat,
      "TemporalTransformer/encoderblock_0/MultiHeadDotProductAttention_0/"
      "query/kernel",
      kind,
    )
    tmlp = _need(
      flat, "TemporalTransformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", kind
    )
    if tq.shape[1] != model["num_heads"]:
      model["temporal_num_heads"] = tq.shape[1]
    if tmlp.shape[1] != model["mlp_dim"]:
      model["temporal_mlp_dim"] = tmlp.shape[1]
    tpe = _need(flat, "TemporalTransformer/posembed_input/pos_embedding", kind)
    num_frames = (tpe.shape[1] - prefix) * kernel.shape[0]
  elif kind == "vivit":  # T'*g*g tokens: one of the two sizes is needed.
    if resolution is None and num_frames is None:
      resolution = 224  # Every published ViViT runs at 224 px.
    if resolution is not None:
      num_frames = n // (resolution // kernel.shape[1]) ** 2 * kernel.shape[0]
    n = n // (num_frames // kernel.shape[0])
  grid = int(round(np.sqrt(n)))
  if grid * grid != n:
    raise ConversionError(
      f"posemb {pe.shape}: {n} tokens are not a square "
      "grid (give --resolution / --num_frames)."
    )
  frames = 1 if kind == "vit" else num_frames
  return model, grid * kernel.shape[1], frames

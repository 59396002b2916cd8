"""vit_jax / AugReg and big_vision `.npz` checkpoints -> flat Scenic tree."""

import re

import numpy as np

from divita_jax.convert.tree import (
  ConversionError,
  Flat,
  renumber_pre_linen,
  strip_prefix,
  to_f32,
  unscan,
)


def _load_npz(path: str) -> Flat:
  try:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
      return {k: to_f32(f[k]) for k in f.files}
  except (OSError, ValueError, EOFError, KeyError) as e:
    raise ConversionError(f"{path}: not a readable .npz file ({e}).") from e
  except Exception as e:  # zipfile.BadZipFile and friends on truncation.
    raise ConversionError(f"{path}: corrupt or truncated .npz ({e}).") from e


def read_vit_npz(path: str) -> Flat:
  """vit_jax / big_vision npz -> flat Scenic ViT tree."""
  flat = strip_prefix(
    _load_npz(path), ("opt/target/", "params/img/", "params/")
  )
  flat = renumber_pre_linen(unscan(flat))
  if "head/kernel" in flat or "head/bias" in flat:
    flat = {
      re.sub(r"^head/", "output_projection/", k): v for k, v in flat.items()
    }
  pe_key = "Transformer/posembed_input/pos_embedding"
  for old in ("pos_embedding", "Transformer/pos_embedding"):
    if old in flat:  # big_vision: no class slot, cls gets no posemb.
      pe = flat.pop(old)
      if "cls" in flat:
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      flat[pe_key] = pe
  return flat

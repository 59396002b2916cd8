"""Flat checkpoint trees ('/'-joined paths): reading helpers and the check.

Every source is first read into a flat dict {path: float32 array} in the
target model's naming; `build_params` then checks it against the model key
by key.
"""

import re
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from divita_jax.models import backbone

Flat = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message says why."""


def to_f32(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    import ml_dtypes  # Raw 2-byte big_vision arrays are bfloat16.

    a = a.view(ml_dtypes.bfloat16)
  return a.astype(np.float32)


def natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def renumber_pre_linen(flat: Flat) -> Flat:
  """Pre-linen names (one counter per parent) -> per-type counters.

  As flax's convert_pre_linen: siblings `<Type>_<n>` are renumbered per
  type in natural order (encoderblock_10 stays after encoderblock_9).
  """
  children: dict[str, set[str]] = {}
  for key in flat:
    parts = key.split("/")
    for i in range(len(parts) - 1):
      children.setdefault("/".join(parts[:i]), set()).add(parts[i])
  rename: dict[tuple[str, str], str] = {}
  for parent, names in children.items():
    by_type: dict[str, list[str]] = {}
    for n in names:
      m = re.fullmatch(r"(.*)_(\d+)", n)
      if m:
        by_type.setdefault(m.group(1), []).append(n)
    for typ, ns in by_type.items():
      for i, n in enumerate(sorted(ns, key=natural_key)):
        rename[(parent, n)] = f"{typ}_{i}"
  out = {}
  for key, value in flat.items():
    parts = key.split("/")
    new = [rename.get(("/".join(parts[:i]), p), p) for i, p in enumerate(parts)]
    out["/".join(new)] = value
  return out


def strip_prefix(flat: Flat, prefixes: Sequence[str]) -> Flat:
  for p in prefixes:
    if flat and all(k.startswith(p) for k in flat):
      return {k[len(p) :]: v for k, v in flat.items()}
  return flat


def unscan(flat: Flat) -> Flat:
  """big_vision scan layout: Transformer/encoderblock/* [depth, ...]."""
  out = {}
  for k, v in flat.items():
    m = re.fullmatch(r"(\w*Transformer)/encoderblock/(.*)", k)
    if not m:
      out[k] = v
      continue
    for i in range(v.shape[0]):
      out[f"{m.group(1)}/encoderblock_{i}/{m.group(2)}"] = v[i]
  return out


def matches(patterns: Sequence[str], key: str) -> bool:
  return any(re.fullmatch(p, key) for p in patterns)


def build_params(
  flat: Flat, spec: dict, dont_load: Sequence[str] = (), seed: int = 0
):
  """Checks flat against the model's tree key by key -> params tree."""
  module = backbone.module_from_spec(spec)
  target = traverse_util.flatten_dict(
    backbone.abstract_params(module, spec), sep="/"
  )
  loaded = {k: v for k, v in flat.items() if not matches(dont_load, k)}
  missing = [k for k in target if k not in loaded and not matches(dont_load, k)]
  unexpected = [k for k in loaded if k not in target]
  shapes = [
    f"{k}: {loaded[k].shape} vs model {target[k].shape}"
    for k in loaded
    if k in target and loaded[k].shape != target[k].shape
  ]
  errors = []
  if missing:
    errors.append(f"missing keys {sorted(missing, key=natural_key)}")
  if unexpected:
    errors.append(f"unexpected keys {sorted(unexpected, key=natural_key)}")
  if shapes:
    errors.append(f"shape mismatches {shapes}")
  if errors:
    raise ConversionError(
      "Checkpoint does not fit the model: " + "; ".join(errors)
    )
  fresh = {}
  if len(loaded) < len(target):
    fresh = traverse_util.flatten_dict(
      backbone.init_params(module, spec, seed), sep="/"
    )
  out = {k: loaded[k] if k in loaded else np.asarray(fresh[k]) for k in target}
  return traverse_util.unflatten_dict(out, sep="/")


def read_torch_state_dict(path: str) -> Flat:
  """PyTorch weights: `.pth` / `.pt` / `.bin` / `.ckpt` (torch.load with
  weights_only: no pickled code runs) or `.safetensors` -> flat {key:
  array}, floats as float32; training checkpoints unwrapped."""
  import torch  # noqa: PLC0415 (conversion-time dependency only)

  if path.endswith(".safetensors"):
    from safetensors.torch import load_file  # noqa: PLC0415

    sd = load_file(path)
  else:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints
      if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
        sd = sd[wrapper]
  out = {}
  for k, v in sd.items():
    if not isinstance(v, torch.Tensor):
      raise ConversionError(
        f"{path}: {k} is not a tensor ({type(v).__name__})."
      )
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out

"""Flat checkpoint trees ('/'-joined paths): reading helpers and the check.

Every source is first read into a flat dict {path: float32 array}.
`check_keys` is the one strict key / shape check of every converter (ViT,
Swin, ConvNets, DIViTA head); `build_params` applies it to the ViT sources,
whose flat dict is already in the model's naming.
"""

import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
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


def drop_keys(flat: Mapping, patterns: Sequence[str], flag=None) -> dict:
  """flat without the keys matching any pattern (re.fullmatch). With
  `flag` (its name in messages), patterns that match nothing are an
  error: a typo must not be ignored silently."""
  out = {k: v for k, v in flat.items() if not matches(patterns, k)}
  if flag and patterns and len(out) == len(flat):
    unmatched(flag, patterns, flat)
  return out


def unmatched(flag: str, patterns: Sequence[str], keys) -> None:
  """Raises: the patterns of --flag match none of keys (some shown)."""
  some = sorted(keys, key=natural_key)[:3]
  raise ConversionError(
    f"--{flag} {list(patterns)} matches none of the {len(keys)} keys "
    f"(e.g. {some})."
  )


def _listed(keys, n=20):
  """Sorted keys (or 'key: ...' lines), the first n and how many more (a
  wrong arch lists hundreds)."""
  keys = sorted(keys, key=natural_key)
  more = f" and {len(keys) - n} more" if len(keys) > n else ""
  return f"{keys[:n]}{more}"


def check_keys(
  got: Mapping[str, tuple],
  want: Mapping[str, tuple | None],
  *,
  unused: Sequence[str] = (),
  model: str = "the model",
) -> None:
  """The one strict check of every converter; raises ConversionError.

  got: key -> shape the checkpoint gives (in the model's layout, e.g.
  torch kernels already transposed); want: key -> shape the model expects
  (None: any). unused: source keys that map to no model key. Keys the
  caller re-initialises (dont_load) or drops on purpose are left out of
  both. The message lists missing keys, unexpected keys (unused ones and
  got keys the model lacks) and shape mismatches, each by key name.
  """
  missing = [k for k in want if k not in got]
  unexpected = [*unused, *(k for k in got if k not in want)]
  shapes = [
    f"{k}: {tuple(got[k])} vs model {tuple(want[k])}"
    for k in got
    if k in want and want[k] is not None and tuple(got[k]) != tuple(want[k])
  ]
  errors = []
  if missing:
    errors.append(f"missing keys {_listed(missing)}")
  if unexpected:
    errors.append(f"unexpected keys {_listed(unexpected)}")
  if shapes:
    errors.append(f"shape mismatches {_listed(shapes)}")
  if errors:
    raise ConversionError(
      f"Checkpoint does not match what {model} expects: " + "; ".join(errors)
    )


def shapes_of(flat: Mapping) -> dict[str, tuple]:
  """key -> shape of arrays or of jax.ShapeDtypeStructs."""
  return {k: tuple(v.shape) for k, v in flat.items()}


def fill_fresh(variables: dict, spec: dict, seed: int = 0) -> dict:
  """variables ({'params': ...} and maybe 'batch_stats') with the leaves
  it lacks (re-initialised by dont_load) from the model's random init
  (backbone.init_variables' values: per-param RNGs fold in the path)."""
  module = backbone.module_from_spec(spec)
  x = backbone.dummy_input(spec)
  have = traverse_util.flatten_dict(variables, sep="/")
  target = traverse_util.flatten_dict(
    backbone.abstract_variables(module, spec), sep="/"
  )
  lacking = [k for k in target if k not in have]

  def init(rng):  # Only the lacking leaves: XLA skips the rest (fast).
    tree = nn.meta.unbox(module.init(rng, x))
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {k: flat[k] for k in lacking}

  fresh = jax.device_get(jax.jit(init)(jax.random.key(seed)))
  out = {k: have[k] if k in have else fresh[k] for k in target}
  return traverse_util.unflatten_dict(out, sep="/")


def build_params(
  flat: Flat,
  spec: dict,
  dont_load: Sequence[str] = (),
  seed: int = 0,
  unused: Sequence[str] = (),
):
  """Checks flat against the model's tree key by key -> params tree.

  Keys matching dont_load are re-initialised: their source values (if
  any) are discarded and the model's random init is written instead.
  unused: source keys that mapped to no model key (errors, by name).
  """
  module = backbone.module_from_spec(spec)
  target = traverse_util.flatten_dict(
    backbone.abstract_params(module, spec), sep="/"
  )
  loaded = drop_keys(flat, dont_load)
  want = shapes_of(drop_keys(target, dont_load, "dont_load"))
  check_keys(
    shapes_of(loaded), want, unused=unused, model=f"the {spec['kind']} model"
  )
  params = traverse_util.unflatten_dict(loaded, sep="/")
  if len(loaded) < len(target):
    params = fill_fresh({"params": params}, spec, seed)["params"]
  return params


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

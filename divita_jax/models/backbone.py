"""Frozen backbones: create (random init) or load (converted checkpoint).

A backbone is (module, params, spec):
- module: `vit.ViT` or `vivit.ViViT`; `module.apply({'params': params}, x)`
  with x float [B, H, W, 3] (ViT) or [B, T, H, W, 3] (ViViT), normalised
  per spec, returns (features [B, feature_dim], intermediates dict with
  'encoded' [B, tokens, D]). Deterministic, jit-friendly; `dtype` is the
  compute dtype (params stay float32).
- params: plain arrays (logical-axis boxes removed); the axis names are
  available through `logical_axes(module, spec)`.
- spec: JSON-able dict: kind, variant, model (module fields), normalization
  (imagenet | minus_one_one | zero_one), mean, std (x = (u8/255 - mean) /
  std), resolution, num_frames, feature_dim, source.

A converted checkpoint directory (`python -m divita_jax.convert`) holds
`params/` (orbax) and `spec.json`.
"""

import copy
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from divita_jax.models import surgery, vit, vivit

NORMALIZATIONS = {
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "zero_one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# Kinds applied to single frames (image models); the others take clips.
IMAGE_KINDS = ("vit", "swin", "resnet", "shufflenet")
SPEC_FILE = "spec.json"
PARAMS_DIR = "params"


def make_spec(
  kind, model, *, variant, normalization, resolution, num_frames, source=None
) -> dict[str, Any]:
  """The spec dict (also written as spec.json by the converter)."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(
      f"Unknown normalization {normalization!r}; {sorted(NORMALIZATIONS)}."
    )
  mean, std = NORMALIZATIONS[normalization]
  return {
    "kind": kind,
    "variant": variant,
    "model": dict(model),
    "normalization": normalization,
    "mean": list(mean),
    "std": list(std),
    "resolution": int(resolution),
    "num_frames": int(num_frames),
    "feature_dim": int(model.get("representation_size") or model["width"]),
    "source": source or {"type": "random_init"},
  }


def input_stats(spec, override: str | None = None) -> tuple[list, list]:
  """(mean, std) of the input convention: a NORMALIZATIONS name given as
  `override` (config.backbones.<b>.normalization), else the spec's own."""
  if override:
    if override not in NORMALIZATIONS:
      raise ValueError(
        f"Unknown normalization {override!r}; {sorted(NORMALIZATIONS)}."
      )
    return tuple(list(v) for v in NORMALIZATIONS[override])
  return list(spec["mean"]), list(spec["std"])


def normalize(pixels_uint8, spec):
  """uint8 RGB [..., 3] -> float32 (x / 255 - mean) / std, in jax."""
  mean, std = input_stats(spec)
  x = jnp.asarray(pixels_uint8, jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def module_from_spec(spec, dtype="float32") -> nn.Module:
  cls = {"vit": vit.ViT, "vivit": vivit.ViViT}.get(spec["kind"])
  if cls is None:
    raise ValueError(f"Unknown backbone kind {spec['kind']!r}; vit | vivit.")
  return cls(**spec["model"], dtype=jnp.dtype(dtype))


def is_image_model(spec) -> bool:
  """True for 2-D backbones: applied per frame, features pooled over T."""
  return spec["kind"] in IMAGE_KINDS


def dummy_input(spec, batch=1):
  r = spec["resolution"]
  if spec["kind"] == "vit":
    return jnp.zeros((batch, r, r, 3), jnp.float32)
  return jnp.zeros((batch, spec["num_frames"], r, r, 3), jnp.float32)


def init_params(module, spec, seed=0):
  """Random params (plain arrays) for the spec's input size."""
  init = jax.jit(module.init)
  return nn.meta.unbox(init(jax.random.key(seed), dummy_input(spec)))["params"]


def abstract_params(module, spec):
  """Shapes/dtypes of the params, without allocating them."""
  tree = jax.eval_shape(module.init, jax.random.key(0), dummy_input(spec))
  return nn.meta.unbox(tree)["params"]


def logical_axes(module, spec):
  """Tree of PartitionSpecs of logical axis names, matching params."""
  tree = jax.eval_shape(module.init, jax.random.key(0), dummy_input(spec))
  return nn.get_partition_spec(tree)["params"]


def create_backbone(
  kind: str,
  variant: str,
  *,
  resolution: int,
  num_frames: int = 1,
  tubelet: int = 2,
  dtype: str = "float32",
  seed: int = 0,
):
  """Randomly initialised backbone -> (module, params, spec).

  variant: 'Ti/16', 'S/16', 'B/16', 'L/16', 'H/14', 'tiny/8' (width 64,
  2 layers); for ViViT also 'B/16x2' (tubelet from the name, else
  `tubelet`). Token classifier, no head, normalization minus_one_one.
  """
  model = vit.decode_variant(variant)
  if kind == "vivit":
    model.setdefault("tubelet", tubelet)
    if num_frames % model["tubelet"]:
      raise ValueError(
        f"num_frames {num_frames} is not a multiple of the tubelet "
        f"{model['tubelet']} of {variant!r}."
      )
  elif kind == "vit":
    if "tubelet" in model:
      raise ValueError(f"ViT variant {variant!r} must not name a tubelet.")
    num_frames = 1
  if resolution % model["patch_size"]:
    raise ValueError(
      f"resolution {resolution} is not a multiple of patch "
      f"{model['patch_size']}."
    )
  spec = make_spec(
    kind,
    model,
    variant=variant,
    normalization="minus_one_one",
    resolution=resolution,
    num_frames=num_frames,
  )
  module = module_from_spec(spec, dtype)
  return module, init_params(module, spec, seed), spec


def token_grid(spec, resolution=None, num_frames=None):
  """Patch grid of the main posemb: (h, w) ViT, (T', h, w) ViViT."""
  m = spec["model"]
  g = (resolution or spec["resolution"]) // m["patch_size"]
  if spec["kind"] == "vit":
    return (g, g)
  return ((num_frames or spec["num_frames"]) // m["tubelet"], g, g)


def resize_params(params, spec, resolution, num_frames):
  """Resamples position embeddings to a new input size -> (params, spec)."""
  old, new = token_grid(spec), token_grid(spec, resolution, num_frames)
  m = spec["model"]
  prefix = int(m.get("classifier", "token") in ("token", "0"))
  params = dict(params)
  if m.get("model_type") == "factorized_encoder":
    for name, o, n in (
      ("SpatialTransformer", old[1:], new[1:]),
      ("TemporalTransformer", old[:1], new[:1]),
    ):
      enc = dict(params[name])
      pe = enc["posembed_input"]["pos_embedding"]
      enc["posembed_input"] = {
        "pos_embedding": surgery.resample_posemb(pe, o, n, prefix)
      }
      params[name] = enc
  else:
    enc = dict(params["Transformer"])
    pe = enc["posembed_input"]["pos_embedding"]
    enc["posembed_input"] = {
      "pos_embedding": surgery.resample_posemb(pe, old, new, prefix)
    }
    params["Transformer"] = enc
  spec = copy.deepcopy(spec)
  spec["resolution"] = resolution
  spec["num_frames"] = num_frames
  return params, spec


def save_backbone(out_dir: str, params, spec) -> None:
  """Writes out_dir/params (orbax) and out_dir/spec.json (atomically)."""
  out_dir = os.path.abspath(out_dir)
  ckpt = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(ckpt):
    raise FileExistsError(f"{ckpt} exists; remove it or pick another output.")
  os.makedirs(out_dir, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, params)
    ckptr.wait_until_finished()
  tmp = os.path.join(out_dir, SPEC_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(out_dir, SPEC_FILE))


def read_spec(ckpt_dir: str) -> dict[str, Any]:
  path = os.path.join(ckpt_dir, SPEC_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {ckpt_dir} is not a converted backbone checkpoint "
      "(run python -m divita_jax.convert)."
    )
  with open(path) as f:
    return json.load(f)


def load_backbone(
  ckpt_dir: str,
  dtype: str = "float32",
  *,
  resolution: int | None = None,
  num_frames: int | None = None,
):
  """Converted checkpoint -> (module, params, spec).

  resolution / num_frames: optional new input size; position embeddings
  are resampled (surgery.resample_posemb) and the returned spec says so.
  """
  spec = read_spec(ckpt_dir)
  module = module_from_spec(spec, dtype)
  target = abstract_params(module, spec)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), target)
  resolution = resolution or spec["resolution"]
  num_frames = num_frames or spec["num_frames"]
  if (resolution, num_frames) != (spec["resolution"], spec["num_frames"]):
    params, spec = resize_params(params, spec, resolution, num_frames)
  return module, jax.tree.map(jnp.asarray, params), spec

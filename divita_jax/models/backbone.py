"""Frozen backbones: create (random init), load or save any of them.

A backbone is (module, variables, spec):
- module: one of MODULES (ViT, ViViT, Swin, Swin3D, ResNet, ShuffleNetV2
  2-D/3-D, R2Plus1D); `module.apply(variables, x)` with x float [B, H, W, 3]
  (image models, `is_image_model`) or [B, T, H, W, 3] (clip models),
  normalised per spec, returns (features [B, feature_dim], intermediates
  with 'encoded' and per-stage features). Deterministic (BatchNorm in eval
  mode), jit-friendly; `dtype` is the compute dtype (params stay float32).
- variables: {'params': ...} plus 'batch_stats' for BatchNorm models, plain
  arrays; the logical axis names come from `logical_axes(module, spec)`.
- spec: JSON-able dict: kind, variant, model (module fields),
  normalization (a NORMALIZATIONS name or "custom"), mean, std (x = (u8/255
  - mean) / std), resolution, num_frames, feature_dim, source, and the
  checkpoint's `preprocessing` (resize, crop, interpolation) when known.

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

from divita_jax import atomic
from divita_jax.models import (
  ast,
  dinov2,
  dinov3,
  r2plus1d,
  resnet,
  shufflenet,
  siglip,
  surgery,
  swin,
  videoprism,
  vit,
  vivit,
  vjepa2,
  whisper,
)

NORMALIZATIONS = {
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  "minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
  "zero_one": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# kind -> module class; the spec's `model` holds its fields.
MODULES = {
  "vit": vit.ViT,
  "vivit": vivit.ViViT,
  "swin": swin.Swin,
  "swin3d": swin.Swin3D,
  "resnet": resnet.ResNet,
  "shufflenet": shufflenet.ShuffleNetV2,  # `dims` 2 or 3.
  "r2plus1d": r2plus1d.R2Plus1D,
  "siglip": siglip.SigLIP,  # frame; MAP-pooled, table resized at run time
  "dinov2": dinov2.DINOv2,  # frame; table resized at run time
  "dinov3": dinov3.DINOv3,  # frame; rotary positions, any grid
  "vjepa2": vjepa2.VJEPA2,  # clip; rotary positions, any frame count
  "videoprism": videoprism.VideoPrism,  # clip; tables resized at run time
  "ast": ast.AST,  # audio: AST log-mel [B, frames, bins]
  "whisper": whisper.WhisperEncoder,  # audio: one 30-s log-mel chunk
}
# 2-D kinds: applied per frame (shufflenet: when `dims` is 2).
FRAME_KINDS = ("vit", "swin", "resnet", "siglip", "dinov2", "dinov3")
# Audio kinds: input log_mel [B, frames, bins]; the spec's resolution is
# the mel bins, num_frames the log-mel frames, front_end log_mel's fields.
AUDIO_KINDS = ("ast", "whisper")
# Kinds whose position embeddings are resampled to a new input size.
POSEMB_KINDS = ("vit", "vivit")
SPEC_FILE = "spec.json"
PARAMS_DIR = "params"


def make_spec(
  kind,
  model,
  *,
  variant,
  resolution,
  num_frames,
  normalization=None,
  mean=None,
  std=None,
  preprocessing=None,
  source=None,
  front_end=None,
) -> dict[str, Any]:
  """The spec dict (also written as spec.json by the converter).

  The input convention is a NORMALIZATIONS name, or explicit `mean` / `std`
  (x = (u8 / 255 - mean) / std, per channel). `preprocessing`: the
  checkpoint's own resize / crop / interpolation, for the record.
  `front_end`: an audio model's log_mel parameters (instead of mean / std).
  """
  if normalization is not None:
    if normalization not in NORMALIZATIONS:
      raise ValueError(
        f"Unknown normalization {normalization!r}; {sorted(NORMALIZATIONS)}."
      )
    mean, std = NORMALIZATIONS[normalization]
  elif front_end is not None:  # Audio: log_mel normalises.
    mean, std = (), ()
  elif mean is None or std is None:
    raise ValueError("make_spec needs a normalization name or mean and std.")
  if kind in POSEMB_KINDS:
    dim = int(model.get("representation_size") or model["width"])
  else:
    dim = pooled_dim(kind, model, resolution, num_frames)
  spec = {
    "kind": kind,
    "variant": variant,
    "model": dict(model),
    "normalization": normalization or "custom",
    "mean": [float(v) for v in mean],
    "std": [float(v) for v in std],
    "resolution": int(resolution),
    "num_frames": int(num_frames),
    "feature_dim": dim,
    "source": source or {"type": "random_init"},
  }
  if preprocessing:
    spec["preprocessing"] = dict(preprocessing)
  if front_end is not None:
    spec["front_end"] = dict(front_end)
  return spec


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


def module_from_spec(spec, dtype="float32") -> nn.Module:
  cls = MODULES.get(spec["kind"])
  if cls is None:
    raise ValueError(
      f"Unknown backbone kind {spec['kind']!r}; {' | '.join(MODULES)}."
    )
  return cls(**spec["model"], dtype=jnp.dtype(dtype))


def is_image_model(spec) -> bool:
  """True for 2-D backbones: applied per frame, features pooled over T."""
  if spec["kind"] == "shufflenet":
    return spec["model"].get("dims", 2) == 2
  return spec["kind"] in FRAME_KINDS


def is_audio_model(spec) -> bool:
  """True for audio encoders: input log_mel [B, frames, bins]."""
  return spec["kind"] in AUDIO_KINDS


def dummy_input(spec, batch=1):
  r = spec["resolution"]
  if is_audio_model(spec):  # [B, log-mel frames, mel bins]
    return jnp.zeros((batch, spec["num_frames"], r), jnp.float32)
  if is_image_model(spec):
    return jnp.zeros((batch, r, r, 3), jnp.float32)
  return jnp.zeros((batch, spec["num_frames"], r, r, 3), jnp.float32)


def init_variables(module, spec, seed=0) -> dict:
  """Random variables ({'params'} plus 'batch_stats' for BatchNorm
  models, plain arrays) for the spec's input size."""
  init = jax.jit(module.init)
  return dict(nn.meta.unbox(init(jax.random.key(seed), dummy_input(spec))))


def init_params(module, spec, seed=0):
  """Random params (plain arrays) for the spec's input size."""
  return init_variables(module, spec, seed)["params"]


def abstract_variables(module, spec) -> dict:
  """Shapes/dtypes of the variables, without allocating them."""
  tree = jax.eval_shape(module.init, jax.random.key(0), dummy_input(spec))
  return dict(nn.meta.unbox(tree))


def abstract_params(module, spec):
  """Shapes/dtypes of the params, without allocating them."""
  return abstract_variables(module, spec)["params"]


def pooled_dim(kind: str, model: dict, resolution: int, frames: int) -> int:
  """Width of the pooled features, from the model's output shape."""
  spec = {"kind": kind, "model": model, "resolution": resolution}
  spec["num_frames"] = frames
  module = module_from_spec(spec)
  x = dummy_input(spec)
  out = jax.eval_shape(
    lambda: module.apply(module.init(jax.random.key(0), x), x)[0]
  )
  return int(out.shape[-1])


def logical_axes(module, spec):
  """Tree of PartitionSpecs of logical axis names, matching params."""
  tree = jax.eval_shape(module.init, jax.random.key(0), dummy_input(spec))
  return nn.get_partition_spec(tree)["params"]


def _random_model(kind: str, variant: str, num_frames: int, tubelet: int):
  """(spec kind, model fields, frames) of a named random-init variant."""
  if kind in ("swin", "swin3d"):
    return kind, swin.decode_variant(variant, video=kind == "swin3d"), None
  if kind == "resnet":
    return kind, resnet.decode_variant(variant), None
  if kind in ("shufflenet", "shufflenet3d"):
    dims = 3 if kind == "shufflenet3d" else 2
    return "shufflenet", shufflenet.decode_variant(float(variant), dims), None
  if kind == "r2plus1d":
    return kind, r2plus1d.decode_variant(variant), None
  if kind == "ast":
    return kind, ast.decode_variant(variant), None
  if kind == "whisper":
    return kind, whisper.decode_variant(variant, num_frames), None
  if kind in ("siglip", "dinov2", "dinov3"):
    family = {"siglip": siglip, "dinov2": dinov2, "dinov3": dinov3}[kind]
    return kind, family.decode_variant(variant), None
  if kind == "vjepa2":
    return kind, vjepa2.decode_variant(variant), None
  if kind == "videoprism":
    return kind, videoprism.decode_variant(variant), None
  if kind not in POSEMB_KINDS:
    raise ValueError(
      f"Unknown backbone kind {kind!r}; {' | '.join(MODULES)} | shufflenet3d."
    )
  model = vit.decode_variant(variant)
  if kind == "vit":
    if "tubelet" in model:
      raise ValueError(f"ViT variant {variant!r} must not name a tubelet.")
    return kind, model, 1
  model.setdefault("tubelet", tubelet)
  if num_frames % model["tubelet"]:
    raise ValueError(
      f"num_frames {num_frames} is not a multiple of the tubelet "
      f"{model['tubelet']} of {variant!r}."
    )
  return kind, model, None


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
  """Randomly initialised backbone -> (module, variables, spec).

  kind: vit | vivit | swin | swin3d | resnet | shufflenet | shufflenet3d |
  r2plus1d. variant: ViT / ViViT 'Ti/16', 'S/16', 'B/16', 'L/16', 'H/14',
  'tiny/8' (width 64, 2 layers), ViViT also 'B/16x2' (tubelet from the
  name, else `tubelet`); Swin 'T', 'S', 'B', 'tiny'; ResNet 'resnet50', ...;
  ShuffleNet the width '1.0', ...; R(2+1)D 'r2plus1d_18'. ViT / ViViT use
  the minus_one_one convention, the others imagenet.
  Also vjepa2 ('L/16', 'g/16', 'tiny/8') and videoprism ('B/18',
  'tiny/8'; zero_one, position tables sized for this input).
  Audio: ast ('B', 'tiny') and whisper ('base', ..., 'tiny') with
  resolution = mel bins, num_frames = log-mel frames.
  """
  kind, model, frames = _random_model(kind, variant, num_frames, tubelet)
  num_frames = frames or num_frames
  norm = "minus_one_one" if kind in (*POSEMB_KINDS, "siglip") else "imagenet"
  if kind == "videoprism":  # inputs in [0, 1]; tables of this input size
    norm = "zero_one"
    model.update(native_resolution=resolution, native_frames=num_frames)
  front_end = _front_end(kind, resolution, num_frames)
  if front_end:  # audio: resolution = mel bins, num_frames = frames
    norm = None
  spec = {"kind": kind, "model": model}
  if is_image_model(spec):
    num_frames = 1
  if kind in POSEMB_KINDS and resolution % model["patch_size"]:
    raise ValueError(
      f"resolution {resolution} is not a multiple of patch "
      f"{model['patch_size']}."
    )
  spec = make_spec(
    kind,
    model,
    variant=variant,
    normalization=norm,
    resolution=resolution,
    num_frames=num_frames,
    front_end=front_end,
  )
  module = module_from_spec(spec, dtype)
  return module, init_variables(module, spec, seed), spec


def _front_end(kind: str, bins: int, frames: int):
  """log_mel's parameters of a random audio model (None: not audio)."""
  if kind == "ast":
    return ast.front_end(bins, frames)
  if kind == "whisper":
    return whisper.front_end(bins, frames)
  return None


def token_grid(spec, resolution=None, num_frames=None):
  """Patch grid of the main posemb: (h, w) ViT, (T', h, w) ViViT."""
  m = spec["model"]
  g = (resolution or spec["resolution"]) // m["patch_size"]
  if spec["kind"] == "vit":
    return (g, g)
  return ((num_frames or spec["num_frames"]) // m["tubelet"], g, g)


def resize_params(params, spec, resolution, num_frames):
  """Resamples position embeddings to a new input size -> (params, spec).

  Backbones without position embeddings take any size as they are.
  Audio backbones take their front end's fixed size only.
  """
  if is_audio_model(spec):
    raise ValueError(
      f"{spec['kind']} takes its front end's {spec['num_frames']} x "
      f"{spec['resolution']} log-mel input; it is not resized."
    )
  if spec["kind"] not in POSEMB_KINDS:
    spec = copy.deepcopy(spec)
    spec["resolution"] = resolution
    spec["num_frames"] = 1 if is_image_model(spec) else num_frames
    return params, spec
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


def save_backbone(out_dir: str, variables, spec) -> None:
  """Writes out_dir/params (orbax) and out_dir/spec.json (atomically).

  variables: {'params': ..., 'batch_stats': ...} (BatchNorm models) or
  {'params': ...}; a bare params tree is accepted too.
  """
  out_dir = os.path.abspath(out_dir)
  ckpt = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(ckpt):
    raise FileExistsError(f"{ckpt} exists; remove it or pick another output.")
  os.makedirs(out_dir, exist_ok=True)
  if "params" not in variables:
    variables = {"params": variables}
  # Models without batch_stats store the params tree alone (the format of
  # every checkpoint converted before BatchNorm backbones existed).
  tree = variables if variables.get("batch_stats") else variables["params"]
  tree = jax.tree.map(np.asarray, tree)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, tree)
    ckptr.wait_until_finished()
  atomic.write_json(os.path.join(out_dir, SPEC_FILE), spec, sort_keys=True)


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
  """Converted checkpoint -> (module, variables, spec).

  `module.apply(variables, x)` returns (pooled, intermediates); variables
  hold 'params' and, for BatchNorm models, 'batch_stats'.
  resolution / num_frames: optional new input size; position embeddings
  are resampled (surgery.resample_posemb) and the returned spec says so.
  """
  spec = read_spec(ckpt_dir)
  module = module_from_spec(spec, dtype)
  target = abstract_variables(module, spec)
  if not target.get("batch_stats"):
    target = target["params"]
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(ckpt_dir, PARAMS_DIR), target)
  variables = dict(tree) if "params" in tree else {"params": tree}
  resolution = resolution or spec["resolution"]
  num_frames = num_frames or spec["num_frames"]
  if (resolution, num_frames) != (spec["resolution"], spec["num_frames"]):
    params, spec = resize_params(
      variables["params"], spec, resolution, num_frames
    )
    variables["params"] = params
  return module, jax.tree.map(jnp.asarray, variables), spec

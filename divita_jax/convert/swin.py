"""torchvision / Hugging Face Swin checkpoints -> `models.swin` params.

Pure functions: a flat {key: numpy array} state dict in, (params tree,
model fields, preprocessing) out. Every source key must land on exactly
one model parameter (q/k/v of Hugging Face fuse into one); classifier
heads are dropped and stored `relative_position_index` buffers are only
checked against the rebuilt index. Anything else raises
`ConversionError` (a ValueError) naming the keys (tree.check_keys).
"""

import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from divita_jax.convert.tree import (
  ConversionError,
  check_keys,
  drop_keys,
  read_torch_state_dict,
  shapes_of,
)
from divita_jax.models import swin, swin_windows

Flat = dict[str, np.ndarray]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# arch -> (variant, video, resize short side, interpolation); torchvision
# 0.28 weight enums (IMAGENET1K_V1, KINETICS400_V1), crop 224 for all.
TORCHVISION_ARCHS = {
  "swin_t": ("T", False, 232, "bicubic"),
  "swin_s": ("S", False, 246, "bicubic"),
  "swin_b": ("B", False, 238, "bicubic"),
  "swin3d_t": ("T", True, 256, "bilinear"),
  "swin3d_s": ("S", True, 256, "bilinear"),
  "swin3d_b": ("B", True, 256, "bilinear"),
}
# Video Swin's recipe trains and tests on 32-frame clips (frame interval 2).
VIDEO_FRAMES = 32


# ---------------------------------------------------------------------------
# Shared checks.


def _param_shapes(fields) -> Flat:
  cls = swin.Swin3D if len(fields["patch"]) == 3 else swin.Swin
  model = cls(**fields)
  x = jnp.zeros((1, *[2 * p for p in fields["patch"]], 3), jnp.float32)
  tree = jax.eval_shape(model.init, jax.random.key(0), x)
  return traverse_util.flatten_dict(nn.meta.unbox(tree["params"]), sep="/")


def check_index(key, stored, window):
  """A stored relative_position_index must equal the rebuilt one."""
  rebuilt = swin_windows.relative_position_index(tuple(window))
  if stored.size != rebuilt.size or not np.array_equal(
    np.asarray(stored).reshape(rebuilt.shape), rebuilt
  ):
    raise ConversionError(
      f"{key}: stored relative_position_index differs from the index "
      f"rebuilt for window {list(window)}."
    )


def finish(mapped: Flat, unknown: list[str], fields, dont_load=()) -> dict:
  """tree.check_keys on mapped {param path: array} -> params tree; params
  matching dont_load are left out (the caller re-initialises them)."""
  mapped = drop_keys(mapped, dont_load)
  want = drop_keys(_param_shapes(fields), dont_load, "dont_load")
  model = "Swin3D" if len(fields["patch"]) == 3 else "Swin"
  check_keys(shapes_of(mapped), shapes_of(want), unused=unknown, model=model)
  flat = {k: np.asarray(v, np.float32) for k, v in mapped.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _named(key, fn, *args):
  """fn(*args), with `key` named in any error (e.g. a failed reshape)."""
  try:
    return fn(*args)
  except ConversionError:
    raise
  except ValueError as e:
    raise ConversionError(f"{key}: {e}") from e


def _linear(w):
  return w.T  # torch [out, in] -> [in, out]


def _conv(w):
  return w.transpose(*range(2, w.ndim), 1, 0)  # [O, I, *k] -> [*k, I, O]


def _qkv_kernel(w, heads):
  c = w.shape[1]
  return w.T.reshape(c, 3, heads, c // heads)  # [C, 3, heads, hd]


def _proj_kernel(w, heads):
  c = w.shape[0]
  return w.T.reshape(heads, c // heads, c)  # [heads, hd, C]


def _norm(name):
  return {"weight": "scale", "bias": "bias"}[name]


def block_param(suffix: str, w: np.ndarray, heads: int):
  """torchvision block key suffix -> (param path suffix, array) or None."""
  m = re.fullmatch(r"(norm1|norm2)\.(weight|bias)", suffix)
  if m:
    return f"{m.group(1)}/{_norm(m.group(2))}", w
  if suffix == "attn.qkv.weight":
    return "attn/qkv/kernel", _qkv_kernel(w, heads)
  if suffix == "attn.qkv.bias":
    return "attn/qkv/bias", w.reshape(3, heads, -1)
  if suffix == "attn.proj.weight":
    return "attn/proj/kernel", _proj_kernel(w, heads)
  if suffix == "attn.proj.bias":
    return "attn/proj/bias", w
  if suffix == "attn.relative_position_bias_table":
    return "attn/relative_position_bias_table", w
  m = re.fullmatch(r"mlp\.(0|3)\.(weight|bias)", suffix)
  if m:
    name = "fc1" if m.group(1) == "0" else "fc2"
    return f"mlp/{name}/{_kernel_or_bias(m.group(2))}", _maybe_t(m, w)
  return None


def _kernel_or_bias(name):
  return {"weight": "kernel", "bias": "bias"}[name]


def _maybe_t(m, w):
  return _linear(w) if m.group(m.lastindex) == "weight" else w


def merge_param(suffix: str, w: np.ndarray):
  """PatchMerging key suffix -> (param path suffix, array) or None."""
  if suffix == "reduction.weight":
    return "downsample/reduction/kernel", _linear(w)
  m = re.fullmatch(r"norm\.(weight|bias)", suffix)
  if m:
    return f"downsample/norm/{_norm(m.group(1))}", w
  return None


def _torchvision_key(key, w, video, fields):
  """One torchvision key -> (param path, array) | 'drop' | None."""
  if key.startswith("head."):
    return "drop"
  m = re.fullmatch(r"norm\.(weight|bias)", key)
  if m:
    return f"norm/{_norm(m.group(1))}", w
  stem = (
    {"patch_embed.proj": "patch_embed", "patch_embed.norm": "patch_norm"}
    if video
    else {"features.0.0": "patch_embed", "features.0.2": "patch_norm"}
  )
  m = re.fullmatch(r"(.+)\.(weight|bias)", key)
  if m and m.group(1) in stem:
    conv = stem[m.group(1)] == "patch_embed"
    name = _kernel_or_bias(m.group(2)) if conv else _norm(m.group(2))
    return f"{stem[m.group(1)]}/{name}", _conv(w) if name == "kernel" else w
  m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
  if not m:
    return None
  # 2-D: features.0 is the stem, stages odd, merges even; 3-D: stages
  # even, merges odd.
  k = int(m.group(1)) - (0 if video else 1)
  stage, is_merge = k // 2, k % 2 == 1
  if k < 0 or stage >= len(fields["depths"]):
    return None
  if is_merge:
    got = merge_param(m.group(2), w)
    return got and (f"stage_{stage}/{got[0]}", got[1])
  b = re.fullmatch(r"(\d+)\.(.+)", m.group(2))
  if not b:
    return None
  if b.group(2) == "attn.relative_position_index":
    check_index(key, w, fields["window"])
    return "drop"
  got = block_param(b.group(2), w, fields["num_heads"][stage])
  return got and (f"stage_{stage}/block_{b.group(1)}/{got[0]}", got[1])


def from_torchvision(state_dict: Flat, arch: str, fields=None, dont_load=()):
  """torchvision swin_{t,s,b} / swin3d_{t,s,b} state dict -> (params,
  model fields, preprocessing). `fields` overrides the arch's (tests);
  params matching dont_load (regexes on param paths) are left out."""
  if arch not in TORCHVISION_ARCHS:
    raise ConversionError(
      f"Unknown arch {arch!r}; {sorted(TORCHVISION_ARCHS)}."
    )
  variant, video, resize, interpolation = TORCHVISION_ARCHS[arch]
  fields = fields or swin.decode_variant(variant, video)
  mapped, unknown = {}, []
  for key, w in state_dict.items():
    got = _named(key, _torchvision_key, key, np.asarray(w), video, fields)
    if got is None:
      unknown.append(key)
    elif got != "drop":
      if got[0] in mapped:
        raise ConversionError(f"{key}: second source for {got[0]}.")
      mapped[got[0]] = got[1]
  params = finish(mapped, unknown, fields, dont_load)
  preprocessing = dict(
    resolution=224,
    num_frames=VIDEO_FRAMES if video else 1,
    resize=resize,
    crop=224,
    interpolation=interpolation,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  )
  return params, fields, preprocessing


# ---------------------------------------------------------------------------
# Hugging Face SwinModel / SwinForImageClassification folders.

# Names before transformers 5 (and on the Hub) -> current names.
_HF_RENAMES = (
  ("attention.self.query.", "attention.q_proj."),
  ("attention.self.key.", "attention.k_proj."),
  ("attention.self.value.", "attention.v_proj."),
  (
    "attention.self.relative_position_bias_table",
    "attention.relative_position_bias.relative_position_bias_table",
  ),
  (
    "attention.self.relative_position_index",
    "attention.relative_position_bias.relative_position_index",
  ),
  ("attention.output.dense.", "attention.o_proj."),
  ("intermediate.dense.", "mlp.fc1."),
  ("output.dense.", "mlp.fc2."),
)
# current HF block suffix -> torchvision's (for `block_param`).
_HF_BLOCK = {
  "layernorm_before": "norm1",
  "layernorm_after": "norm2",
  "attention.o_proj": "attn.proj",
  "attention.relative_position_bias.relative_position_bias_table": (
    "attn.relative_position_bias_table"
  ),
  "mlp.fc1": "mlp.0",
  "mlp.fc2": "mlp.3",
}
_HF_PIL = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def hf_fields(config: dict) -> dict:
  """HF SwinConfig -> `Swin` fields; refuses what the model lacks."""
  bad = []
  if config.get("use_absolute_embeddings"):
    bad.append("use_absolute_embeddings")
  if config.get("hidden_act", "gelu") != "gelu":
    bad.append(f"hidden_act {config['hidden_act']!r}")
  if not config.get("qkv_bias", True):
    bad.append("qkv_bias False")
  if config.get("num_channels", 3) != 3:
    bad.append("num_channels != 3")
  if bad:
    raise ConversionError(f"Unsupported Swin config: {bad}.")
  w, p = config["window_size"], config["patch_size"]
  return dict(
    embed_dim=config["embed_dim"],
    depths=list(config["depths"]),
    num_heads=list(config["num_heads"]),
    window=[w, w],
    patch=[p, p],
    # The MS original shrinks small grids' windows and pads the input.
    shrink_window=True,
    pad_input=True,
    mlp_ratio=float(config.get("mlp_ratio", 4.0)),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
  )


def _hf_canonical(key: str) -> str:
  for prefix in ("swin.", "model."):
    if key.startswith(prefix):
      key = key[len(prefix) :]
  for old, new in _HF_RENAMES:
    key = key.replace(old, new)
  return key


def _hf_block(rest, value, heads, fused, block):
  """One HF block key suffix -> (path suffix, array) | 'drop' | None."""
  m = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest)
  if m:  # q, k, v are fused into qkv once all three are seen
    fused.setdefault((block, m.group(2)), {})[m.group(1)] = value
    return "drop"
  if rest == "attention.relative_position_bias.relative_position_index":
    return "index"
  m = re.fullmatch(r"(.+)\.(weight|bias|relative_position_bias_table)", rest)
  if m and m.group(1) in _HF_BLOCK:
    return block_param(f"{_HF_BLOCK[m.group(1)]}.{m.group(2)}", value, heads)
  if rest in _HF_BLOCK:
    return block_param(_HF_BLOCK[rest], value, heads)
  return None


def _hf_key(key, value, fields, fused):
  """One HF key -> (param path, array) | 'drop' | None."""
  k = _hf_canonical(key)
  if k.startswith("classifier."):
    return "drop"
  simple = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed/kernel",
    "embeddings.patch_embeddings.projection.bias": "patch_embed/bias",
    "embeddings.norm.weight": "patch_norm/scale",
    "embeddings.norm.bias": "patch_norm/bias",
    "layernorm.weight": "norm/scale",
    "layernorm.bias": "norm/bias",
  }
  if k in simple:
    return simple[k], _conv(value) if simple[k].endswith("kernel") else value
  m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
  if not m or int(m.group(1)) >= len(fields["depths"]):
    return None
  stage, rest = int(m.group(1)), m.group(2)
  d = re.fullmatch(r"downsample\.(.+)", rest)
  if d:
    got = merge_param(d.group(1), value)
    return got and (f"stage_{stage}/{got[0]}", got[1])
  b = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
  if not b:
    return None
  block = f"stage_{stage}/block_{b.group(1)}"
  heads = fields["num_heads"][stage]
  got = _hf_block(b.group(2), value, heads, fused, block)
  if got == "index":
    check_index(key, value, fields["window"])
    return "drop"
  return got if got in (None, "drop") else (f"{block}/{got[0]}", got[1])


def _fuse_qkv(fused, fields, mapped, unknown):
  """q/k/v weights [C, C] (biases [C]) -> qkv kernel / bias."""
  for (block, kind), parts in fused.items():
    if set(parts) != {"q", "k", "v"}:
      unknown.append(f"{block}: q/k/v {kind} has only {sorted(parts)}")
      continue
    heads = fields["num_heads"][int(block.split("/")[0].split("_")[1])]
    w = np.concatenate([parts[n] for n in "qkv"], axis=0)  # [3C, ...]
    if kind == "weight":
      mapped[f"{block}/attn/qkv/kernel"] = _qkv_kernel(w, heads)
    else:
      mapped[f"{block}/attn/qkv/bias"] = w.reshape(3, heads, -1)


def hf_preprocessing(folder: str, config: dict) -> dict:
  """From preprocessor_config.json when present, else the MS recipe."""
  size = config.get("image_size", 224)
  pre = dict(
    resolution=size,
    num_frames=1,
    resize=int(size / 0.875),  # MS Swin eval: crop ratio 224/256
    crop=size,
    interpolation="bicubic",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  )
  path = os.path.join(folder, "preprocessor_config.json")
  if os.path.exists(path):
    with open(path) as f:
      p = json.load(f)
    s = p.get("size", size)
    s = s.get("shortest_edge") or s.get("height") if isinstance(s, dict) else s
    crop = p.get("crop_size", s) if p.get("do_center_crop") else s
    crop = crop.get("height") if isinstance(crop, dict) else crop
    pre.update(resize=int(s), crop=int(crop), resolution=int(crop))
    pre["interpolation"] = _HF_PIL.get(p.get("resample", 3), "bicubic")
    pre["mean"] = [float(v) for v in p.get("image_mean", IMAGENET_MEAN)]
    pre["std"] = [float(v) for v in p.get("image_std", IMAGENET_STD)]
  return pre


def from_hf_swin(folder: str, drop=(), dont_load=()):
  """HF Swin folder (config.json + model.safetensors / pytorch_model.bin)
  -> (params, model fields, preprocessing). drop: regexes on the file's
  keys to discard; dont_load: param paths left out (re-initialised)."""
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  files = [
    os.path.join(folder, n)
    for n in ("model.safetensors", "pytorch_model.bin")
    if os.path.exists(os.path.join(folder, n))
  ]
  if not files:
    raise ConversionError(
      f"No model.safetensors / pytorch_model.bin in {folder}."
    )
  fields = hf_fields(config)
  sd = drop_keys(read_torch_state_dict(files[0]), drop, "drop")
  params = from_hf_state_dict(sd, fields, dont_load)
  return params, fields, hf_preprocessing(folder, config)


def from_hf_state_dict(state_dict: Flat, fields, dont_load=()) -> dict:
  """Flat HF Swin state dict -> params (strict, as `from_torchvision`)."""
  mapped, unknown, fused = {}, [], {}
  for key, w in state_dict.items():
    got = _named(key, _hf_key, key, np.asarray(w), fields, fused)
    if got is None:
      unknown.append(key)
    elif got != "drop":
      if got[0] in mapped:
        raise ConversionError(f"{key}: second source for {got[0]}.")
      mapped[got[0]] = got[1]
  _fuse_qkv(fused, fields, mapped, unknown)
  return finish(mapped, unknown, fields, dont_load)


def inflate_to_3d(params: dict, patch_t: int = 2, window_t: int = 8) -> dict:
  """2-D Swin params -> `Swin3D` params (Video Swin's ImageNet init).

  The patch kernel is split evenly over its `patch_t` time taps and each
  bias table is repeated for all 2 * window_t - 1 time offsets, so a
  static clip gives the 2-D features (while T' needs no padding).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for k, v in flat.items():
    v = np.asarray(v)
    if k == "patch_embed/kernel":  # [ph, pw, 3, C] -> [pt, ph, pw, 3, C]
      v = np.stack([v / patch_t] * patch_t)
    elif k.endswith("relative_position_bias_table"):  # time is slowest
      v = np.tile(v, (2 * window_t - 1, 1))
    out[k] = v
  return traverse_util.unflatten_dict(out, sep="/")

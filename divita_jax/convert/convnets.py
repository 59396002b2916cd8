"""torchvision and Efficient-3DCNNs ConvNets -> Flax ResNet / ShuffleNetV2 /
R2Plus1D variables.

Pure functions on flat {name: array} state dicts:
- `from_torchvision(sd, arch)`: resnet18..152, shufflenet_v2_x0_5..x2_0,
  r2plus1d_18.
- `from_efficient3d(sd, width)`: okankop/Efficient-3DCNNs `shufflenetv2`
  (`{'state_dict': ...}`, `module.` prefixes, `features.{i}`, `banch1/2`,
  `conv_last`), any class count.
Both return (variables {'params', 'batch_stats'}, model fields, preprocessing)
and are strict: every source key lands on exactly one leaf (the classifier
and `num_batches_tracked` are dropped), and unexpected keys, missing keys
and shape mismatches raise ConversionError listing them (tree.check_keys).

preprocessing: x = (u8 / 255 - mean) / std at `resolution`; resize is the
short side (or (h, w)) before the centre crop.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from divita_jax.convert.tree import (
  ConversionError,
  check_keys,
  matches,
  read_torch_state_dict,
  unmatched,
)
from divita_jax.models import r2plus1d, resnet, shufflenet

Flat = dict[str, np.ndarray]

_IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _image_prep(resize: int) -> dict[str, Any]:
  return dict(
    resolution=224, num_frames=1, resize=resize, crop=224,
    interpolation="bilinear", **_IMAGENET,
  )  # fmt: skip


R2PLUS1D_PREPROCESSING = dict(
  resolution=112,
  num_frames=16,  # torchvision's recipe: 16-frame clips at 15 fps
  resize=[128, 171],
  crop=112,
  interpolation="bilinear",
  mean=[0.43216, 0.394666, 0.37645],
  std=[0.22803, 0.22145, 0.216989],
)
# 0-255 pixels minus the ActivityNet mean, no std division: in the
# (u8/255 - mean)/std convention, mean/255 and std 1/255.
EFFICIENT3D_PREPROCESSING = dict(
  resolution=112,
  num_frames=16,
  resize=112,
  crop=112,
  interpolation="bilinear",
  mean=[v / 255 for v in (114.7748, 107.7354, 99.4750)],
  std=[1 / 255] * 3,
)

# arch -> (kind, model fields, preprocessing). kind: resnet | shufflenet |
# r2plus1d, the module class is KINDS[kind].
TORCHVISION_ARCHS = {
  **{
    name: ("resnet", resnet.decode_variant(name), _image_prep(256))
    for name in resnet.VARIANTS
  },
  **{
    f"shufflenet_v2_x{w}".replace(".", "_"): (
      "shufflenet",
      shufflenet.decode_variant(w, 2),
      _image_prep(256 if w <= 1 else 232),
    )
    for w in shufflenet.TORCHVISION_WIDTHS
  },
  "r2plus1d_18": (
    "r2plus1d",
    r2plus1d.decode_variant("r2plus1d_18"),
    R2PLUS1D_PREPROCESSING,
  ),
}
KINDS = {
  "resnet": resnet.ResNet,
  "shufflenet": shufflenet.ShuffleNetV2,
  "r2plus1d": r2plus1d.R2Plus1D,
}
# Classifier prefixes dropped from the sources.
_HEADS = ("fc.", "classifier.")


def read_state_dict(path: str) -> Flat:
  """torchvision / Efficient-3DCNNs weights (see tree.read_torch_state_dict)."""
  return read_torch_state_dict(path)


def _unwrap(sd):
  """Training checkpoints keep the weights under 'state_dict'."""
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    return sd["state_dict"]
  return sd


def _abstract_variables(module, dims):
  """Shapes of the module's variables at a small input."""
  shape = (1, 32, 32, 3) if dims == 2 else (1, 4, 32, 32, 3)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = jax.eval_shape(module.init, jax.random.key(0), x)
  return nn.meta.unbox(tree)


_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def _torch_value(collection, leaf, w: np.ndarray) -> np.ndarray:
  if (collection, leaf) == ("params", "kernel"):
    # torch [out, in/groups, *k] -> Flax [*k, in/groups, out]
    w = np.transpose(w, (*range(2, w.ndim), 1, 0))
  return w


def _targets(abstract, torch_name):
  """(collection, Flax path, torch key, shape) of every model leaf."""
  for collection in ("params", "batch_stats"):
    leaves = jax.tree_util.tree_flatten_with_path(abstract[collection])[0]
    for path, leaf in leaves:
      names = tuple(p.key for p in path)
      key = f"{torch_name('/'.join(names[:-1]))}."
      key += _LEAF[collection, names[-1]]
      yield collection, names, key, leaf.shape


def convert(sd, module, dims: int, torch_name, dont_load=()) -> dict[str, Any]:
  """Flat torch state dict -> {'params', 'batch_stats'} for `module`.

  torch_name maps a Flax module path ('layer1_0/conv1') to its torch
  prefix ('layer1.0.conv1'). Keys are checked in torch naming
  (tree.check_keys). Leaves whose Flax path (no collection, e.g.
  'conv1/kernel', 'layer1_0/bn1/mean') matches dont_load are left out and
  their source keys discarded (the caller re-initialises them)."""
  sd = {re.sub(r"^module\.", "", k): v for k, v in _unwrap(sd).items()}
  sd = {
    k: v
    for k, v in sd.items()
    if not k.endswith("num_batches_tracked") and not k.startswith(_HEADS)
  }
  targets = list(_targets(_abstract_variables(module, dims), torch_name))
  keep = [t for t in targets if not matches(dont_load, "/".join(t[1]))]
  if dont_load and len(keep) == len(targets):
    unmatched("dont_load", dont_load, ["/".join(t[1]) for t in targets])
  want = {key: shape for _, _, key, shape in keep}
  skipped = {t[2] for t in targets} - set(want)
  got, out = {}, {"params": {}, "batch_stats": {}}
  for collection, names, key, _ in keep:
    if key in sd:
      w = _torch_value(collection, names[-1], np.asarray(sd[key]))
      got[key] = w.shape
      out[collection][names] = np.ascontiguousarray(w, np.float32)
  unused = [k for k in sd if k not in want and k not in skipped]
  check_keys(got, want, unused=unused, model=type(module).__name__)
  return {c: _unflatten(flat) for c, flat in out.items()}


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def torchvision_name(path: str) -> str:
  """Our module names are torchvision's with '.' -> '_'."""
  return path.replace("/", ".").replace("_", ".")


def from_torchvision(state_dict: Flat, arch: str, dont_load=()):
  """torchvision state dict -> (variables, model fields, preprocessing);
  leaves matching dont_load are left out (see `convert`)."""
  if arch not in TORCHVISION_ARCHS:
    raise ConversionError(
      f"Unknown torchvision arch {arch!r}; {sorted(TORCHVISION_ARCHS)}."
    )
  kind, fields, prep = TORCHVISION_ARCHS[arch]
  dims = 3 if kind == "r2plus1d" else 2
  module = KINDS[kind](**fields)
  variables = convert(state_dict, module, dims, torchvision_name, dont_load)
  return variables, dict(fields), dict(prep)


def efficient3d_name(path: str, repeats=(4, 8, 4)) -> str:
  """'stage3_1/branch2_0' -> 'features.5.banch2.0'; conv5 -> conv_last."""
  name = torchvision_name(path)
  m = re.match(r"stage(\d)\.(\d+)\.", name)
  if m:
    index = sum(repeats[: int(m.group(1)) - 2]) + int(m.group(2))
    name = f"features.{index}." + name[m.end() :]
  name = name.replace("branch", "banch")
  return re.sub(r"^conv5\.", "conv_last.", name)


def from_efficient3d(state_dict: Flat, width: float = 1.0, dont_load=()):
  """Efficient-3DCNNs shufflenetv2 checkpoint -> (variables, fields,
  preprocessing); the classifier (600 classes for Kinetics-600) is dropped,
  leaves matching dont_load are left out (see `convert`)."""
  fields = shufflenet.decode_variant(width, 3)
  module = shufflenet.ShuffleNetV2(**fields)
  variables = convert(state_dict, module, 3, efficient3d_name, dont_load)
  return variables, dict(fields), dict(EFFICIENT3D_PREPROCESSING)

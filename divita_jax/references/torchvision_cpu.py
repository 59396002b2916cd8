"""`import torchvision` for the CPU torch build (tests and benchmarks only).

Parity references, not used by the library: importing divita_jax never
imports this module or torch.

The registry's torchvision 0.28.0 is a CUDA build: its C ops cannot load on
a CPU machine, and its meta registrations then fail on the missing
`torchvision::nms` schema. Declaring the two schemas first makes the model
code importable; none of the reference models calls a C op. transformers
imports torchvision when it is installed, so call this before it.
"""

import functools

import torch

SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY = None  # Kept alive: dropping it removes the schemas.


@functools.cache
def torchvision():
  """The torchvision module, importable with the CPU torch build."""
  global _LIBRARY
  try:
    torch.ops.torchvision.nms  # noqa: B018 (probe: schemas already there?)
  except (AttributeError, RuntimeError):
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms" + SCHEMA)
    _LIBRARY.define("qnms" + SCHEMA)
  import torchvision as tv  # noqa: PLC0415 (after the schemas, on purpose)

  return tv

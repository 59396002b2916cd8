"""Prepared trailers: the expensive half of a build, one file per trailer.

Generating or transcoding a trailer and detecting its shots is nearly all
of a build's time. Each result is saved here as soon as it is computed
(by the local build's main process, or by a Beam worker), so a killed
build or pipeline resumes without redoing finished trailers. Skipped
trailers are saved too, with their reason. The folder lives beside the
dataset (`<data_dir>/trailers12k/<config>/<version>.prepared`; for Beam,
on a filesystem every worker sees) and is deleted once the dataset is
written.

Files are .npz without pickles: bytes as uint8 arrays, strings as unicode
arrays, the rest as arrays; written to a temporary name, then renamed.
"""

import os

import numpy as np
from etils import epath

_BYTES, _STR, _ARRAY = "bytes/", "str/", "array/"


class PreparedExamples:
  """Folder of (id, features or None, skip reason) results, keyed by id."""

  def __init__(self, root: str | os.PathLike):
    self.root = epath.Path(root)

  def path(self, mid: str) -> epath.Path:
    return self.root / f"{mid}.npz"

  def has(self, mid: str) -> bool:
    return self.path(mid).exists()

  def save(self, mid: str, ex: dict | None, reason: str) -> None:
    arrays = {"reason": np.array(reason)}
    for k, v in (ex or {}).items():
      if isinstance(v, bytes):
        arrays[_BYTES + k] = np.frombuffer(v, np.uint8)
      elif isinstance(v, str):
        arrays[_STR + k] = np.array(v)
      else:
        arrays[_ARRAY + k] = np.asarray(v)
    self.root.mkdir(parents=True, exist_ok=True)
    tmp = self.root / f".{mid}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.rename(self.path(mid))

  def reason(self, mid: str) -> str:
    """The saved skip reason; "" for an example (its features not read)."""
    with np.load(self.path(mid), allow_pickle=False) as f:
      return str(f["reason"])

  def skipped(self, mid: str) -> bool:
    """A saved skip (not an example)."""
    return bool(self.reason(mid))

  def load(self, mid: str) -> tuple[str, dict | None, str]:
    """(id, features or None if skipped, reason), as the worker returned."""
    try:
      with np.load(self.path(mid), allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(
        f"Prepared trailer {self.path(mid)} is unreadable ({e}); delete it "
        "to prepare that trailer again."
      ) from e
    reason = str(data.pop("reason"))
    ex = {}
    for k, v in data.items():
      if k.startswith(_BYTES):
        ex[k[len(_BYTES) :]] = v.tobytes()
      elif k.startswith(_STR):
        ex[k[len(_STR) :]] = str(v)
      else:
        ex[k[len(_ARRAY) :]] = v[()] if v.ndim == 0 else v
    return mid, None if reason else ex, reason

  def remove(self) -> None:
    if self.root.exists():
      self.root.rmtree()

"""Atomic result files: readers see the old file or the new one, never half.

Every result (config.json, summaries, CSVs, reps, indexes) is written to a
temporary sibling and renamed over the target. Files get the usual
permissions (0644 under the default umask, unlike `mkstemp`'s 0600), so
other users and the other hosts of a job can read them. Paths go through
`etils.epath`, so `gs://` and other remote paths work too.
"""

import json
import os
import uuid

from etils import epath


def write_bytes(path, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()  # Our own temporary file, never the user's.
    raise


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, **kwargs) -> None:
  """Strict JSON (NaN is an error, not a bare `NaN` token)."""
  kwargs.setdefault("indent", 2)
  write_text(path, json.dumps(obj, **kwargs) + "\n")
